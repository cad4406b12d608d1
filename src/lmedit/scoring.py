"""Scoring primitives shared by every method and metric.

* ``join(prompt, target)``: the one rule for where a continuation starts (a space is inserted when
  neither side has one), so ``"Paris"`` and ``" Paris"`` score the same.
* ``encode``: tokenise (prompt, target) pairs **jointly** — the target's tokens are those of
  ``prompt + target`` after the prompt's own tokens, exactly as the model would see the text; the
  tokenizer's BOS handling is kept; batches are left-padded with explicit position ids.
* ``target_logprobs``: differentiable per-token ``log P(y_t | prompt, y_<t)`` (used for training losses).
* ``score_continuations``: the same under ``no_grad`` → log-probability, teacher-forced accuracy.
* ``generate``: batched greedy generation of continuations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lmedit.errors import RequestError


def join(prompt: str, target: str) -> tuple[str, str]:
    """(prompt, target) with a single space inserted before ``target`` when neither side has one."""
    if target and not target[0].isspace() and prompt and not prompt[-1].isspace():
        target = " " + target
    return prompt, target


@dataclass
class Batch:
    """Left-padded token ids for (prompt, target) pairs.

    ``target_mask[b, j]`` is True where ``input_ids[b, j]`` is a target token; the logits that predict
    it sit at position ``j - 1``. Targets end at the last position (left padding), so the logits of the
    last ``n_target + 1`` positions are all a loss needs.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    prompt_lengths: list[int]  # unpadded prompt lengths (BOS included)
    target_lengths: list[int]

    @property
    def n_target(self) -> int:
        return max(self.target_lengths) if self.target_lengths else 0

    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device),
                     self.prompt_lengths, self.target_lengths)


def _tokenize(model: Any, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=not model.chat)["input_ids"]


def encode(model: Any, prompts: Sequence[str], targets: Sequence[str] | None = None) -> Batch:
    """Tokenise prompts (and optional targets) into a left-padded ``Batch`` on the model's device."""
    if targets is not None and len(targets) != len(prompts):
        raise RequestError(f"{len(prompts)} prompts but {len(targets)} targets")
    rows: list[tuple[list[int], list[int]]] = []
    for i, prompt in enumerate(prompts):
        text = model.format_prompt(prompt)
        p_ids = _tokenize(model, text)
        t_ids: list[int] = []
        if targets is not None:
            text, target = join(text, targets[i])
            if not target.strip():
                raise RequestError(f"empty target for prompt {prompt!r}")
            full = _tokenize(model, text + target)
            if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
                t_ids = full[len(p_ids):]
            else:  # the tokenizer merged across the boundary: fall back to separate tokenisation
                t_ids = model.tokenizer(target, add_special_tokens=False)["input_ids"]
        if not p_ids:
            raise RequestError(f"the prompt {prompt!r} tokenises to nothing")
        rows.append((p_ids, t_ids))
    width = max(len(p) + len(t) for p, t in rows)
    pad = model.tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (p, t) in enumerate(rows):
        ids = p + t
        input_ids[b, width - len(ids):] = torch.tensor(ids)
        attention[b, width - len(ids):] = 1
        if t:
            target_mask[b, width - len(t):] = True
    return Batch(input_ids, attention, target_mask, [len(p) for p, _ in rows], [len(t) for _, t in rows]).to(model.device)


def forward_logits(model: Any, batch: Batch, last: int | None = None) -> torch.Tensor:
    """Logits ``[B, last or L, V]`` of the last ``last`` positions (all when ``None``)."""
    kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                              "position_ids": batch.position_ids(), "use_cache": False}
    if last is not None:
        kwargs["logits_to_keep"] = last
    try:
        logits = model.module(**kwargs).logits
    except TypeError:  # architectures without logits_to_keep
        kwargs.pop("logits_to_keep", None)
        logits = model.module(**kwargs).logits
    return logits if last is None else logits[:, -last:]


def target_logprobs(model: Any, batch: Batch) -> torch.Tensor:
    """Differentiable ``log P(y_t | prompt, y_<t)`` as ``[B, T]`` aligned right (0 where padded).

    Column ``j`` of the result is the target token at input position ``L - T + j``.
    """
    n = batch.n_target
    logits = forward_logits(model, batch, last=n + 1)[:, :-1].float()  # logits predicting the last n tokens
    targets = batch.input_ids[:, -n:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp * batch.target_mask[:, -n:]


@dataclass
class ContinuationScore:
    """How a model scores one target continuation under teacher forcing."""

    prompt: str
    target: str
    token_ids: list[int]
    token_logprobs: list[float]
    argmax_ids: list[int]

    @property
    def logprob(self) -> float:
        """``log P(target | prompt)`` = Σ_t log P(y_t | prompt, y_<t)."""
        return float(sum(self.token_logprobs))

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(1, len(self.token_logprobs))

    @property
    def token_accuracy(self) -> float:
        """Teacher-forced token accuracy: the fraction of target tokens that are the argmax."""
        hits = sum(a == t for a, t in zip(self.argmax_ids, self.token_ids))
        return hits / max(1, len(self.token_ids))


@torch.no_grad()
def score_continuations(model: Any, prompts: Sequence[str], targets: Sequence[str],
                        batch_size: int = 32) -> list[ContinuationScore]:
    """Teacher-forced scores of ``targets`` after ``prompts`` (batched, one forward pass per batch)."""
    if len(targets) != len(prompts):
        raise RequestError(f"{len(prompts)} prompts but {len(targets)} targets")
    # Similar lengths share a batch (less padding); results come back in the callers' order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(targets[i]))
    out: list[ContinuationScore | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ps, ts = [prompts[i] for i in idx], [targets[i] for i in idx]
        batch = encode(model, ps, ts)
        n = batch.n_target
        logits = forward_logits(model, batch, last=n + 1)[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        ids = batch.input_ids[:, -n:]
        chosen = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        argmax = logits.argmax(-1)
        for b, (i, p, t) in enumerate(zip(idx, ps, ts)):
            k = batch.target_lengths[b]
            out[i] = ContinuationScore(p, t, ids[b, n - k:].tolist(), chosen[b, n - k:].tolist(),
                                       argmax[b, n - k:].tolist())
    return out  # type: ignore[return-value]


@torch.no_grad()
def generate_ids(model: Any, prompts: Sequence[str], max_new_tokens: int = 20, batch_size: int = 32,
                 **generate_kwargs: Any) -> list[list[int]]:
    """Token ids of the greedy continuations of ``prompts`` (new tokens only, up to EOS excluded)."""
    tok = model.tokenizer
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = encode(model, [prompts[i] for i in idx])
        kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id,
                  **generate_kwargs}
        if not kwargs["do_sample"]:
            kwargs.update(top_p=None, top_k=None, temperature=None)
        ids = model.module.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
        stop = set(_eos_ids(model))
        for i, row in zip(idx, ids[:, batch.input_ids.shape[1]:].tolist()):
            cut = next((j for j, t in enumerate(row) if t in stop), len(row))
            out[i] = row[:cut]
    return out


def _eos_ids(model: Any) -> list[int]:
    eos = getattr(model.module.generation_config, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos]
    return [i for i in ids + [model.tokenizer.eos_token_id] if i is not None]


def generate(model: Any, prompts: str | Sequence[str], max_new_tokens: int = 20, batch_size: int = 32,
             **generate_kwargs: Any) -> str | list[str]:
    """Greedy continuations of ``prompts`` (only the new text, special tokens removed)."""
    single = isinstance(prompts, str)
    items = [prompts] if single else list(prompts)
    rows = generate_ids(model, items, max_new_tokens, batch_size, **generate_kwargs)
    out = [model.tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    return out[0] if single else out
