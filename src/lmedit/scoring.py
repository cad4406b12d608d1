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
from typing import Any, Callable, Sequence

import torch

from lmedit.errors import RequestError
from lmedit.hooks import Hooks
from lmedit.models.loading import require_model
from lmedit.models.spec import get_module


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
    return tokenize(model, text)[0]


def tokenize(model: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` as lmedit feeds it to ``model``, with each token's character span.

    The tokenizer's own special tokens are added (BOS where it has one). When it adds none, the
    model's document-start token (``model.doc_start``, e.g. ``<|endoftext|>``) is prepended, so that a
    prompt's first word is not read at the first position — the attention sink, whose states are
    degenerate in such models (on SmolLM2, ROME edits of subject-initial prompts fail without it).
    Chat-formatted text is taken as the template writes it. Offsets are ``(0, 0)`` for added tokens.
    """
    enc = model.tokenizer(text, add_special_tokens=not model.chat, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    start = getattr(model, "doc_start", None)
    if start is not None and not model.chat and (not ids or ids[0] != start):
        ids, offsets = [start] + ids, [(0, 0)] + offsets
    return ids, offsets


def _prompt_ids(model: Any, prompt: str) -> tuple[str, list[int]]:
    """(the prompt as the model sees it, its token ids)."""
    text = model.format_prompt(prompt)
    ids = _tokenize(model, text)
    if not ids:
        raise RequestError(f"the prompt {prompt!r} tokenises to nothing")
    return text, ids


def _continuation_ids(model: Any, text: str, p_ids: list[int], target: str) -> list[int]:
    """Token ids of ``target`` as it continues ``text``: those of ``text + target`` after ``p_ids``."""
    text, target = join(text, target)
    if not target.strip():
        raise RequestError(f"empty target for prompt {text!r}")
    full = _tokenize(model, text + target)
    if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
        return full[len(p_ids):]
    # The tokenizer merged across the boundary: fall back to tokenising the target alone.
    return model.tokenizer(target, add_special_tokens=False)["input_ids"]


def encode(model: Any, prompts: Sequence[str], targets: Sequence[str] | None = None) -> Batch:
    """Tokenise prompts (and optional targets) into a left-padded ``Batch`` on the model's device."""
    if targets is not None and len(targets) != len(prompts):
        raise RequestError(f"{len(prompts)} prompts but {len(targets)} targets")
    rows: list[tuple[list[int], list[int]]] = []
    for i, prompt in enumerate(prompts):
        text, p_ids = _prompt_ids(model, prompt)
        rows.append((p_ids, [] if targets is None else _continuation_ids(model, text, p_ids, targets[i])))
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
    logits = _model_logits(model, batch, last)
    return logits if last is None else logits[:, -last:]


def _model_logits(model: Any, batch: Batch, last: int | None) -> torch.Tensor:
    """The model's logits, asking for the last ``last`` positions where the architecture accepts it."""
    kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                              "position_ids": batch.position_ids(), "use_cache": False}
    if last is not None:
        kwargs["logits_to_keep"] = last
    try:
        return model.module(**kwargs).logits
    except TypeError:  # architectures without logits_to_keep
        kwargs.pop("logits_to_keep", None)
        return model.module(**kwargs).logits


class FixedPrefix:
    """Repeated forward passes over one batch whose first ``cut`` positions never change.

    Optimisation loops (v* in the locate-then-edit methods) run the same prompts many times while
    only positions from the subject on can change. The prefix ``[0, cut)`` is run once with a KV
    cache; every ``logits`` call runs only the suffix on a copy of that cache, so a step costs
    ``(L - cut) / L`` of a full pass. Falls back to full passes for models without a KV cache.
    """

    def __init__(self, model: Any, batch: Batch, cut: int) -> None:
        self.model, self.batch, self.cut, self.cache = model, batch, max(0, cut), None
        self.positions = batch.position_ids()
        if self.cut == 0:
            return
        try:
            with torch.no_grad():
                out = model.module(input_ids=batch.input_ids[:, :self.cut], attention_mask=batch.attention_mask[:, :self.cut],
                                   position_ids=self.positions[:, :self.cut], use_cache=True,
                                   logits_to_keep=1)  # only the cache is wanted
            self.cache = getattr(out, "cache", None) or out.past_key_values
        except (TypeError, ValueError, NotImplementedError):
            self.cache = None
        if self.cache is None:
            self.cut = 0

    def logits(self, last: int) -> torch.Tensor:
        """Logits ``[B, last, V]`` of the batch's last ``last`` positions (``last ≤ L − cut``)."""
        return self._run(last)[:, -last:]

    def logits_where(self, reads: torch.Tensor) -> torch.Tensor:
        """Logits ``[M, V]`` at the positions where ``reads`` (``[B, L]``, none before ``cut``) is True
        (``logits_at``: the unembedding sees only those)."""
        if bool(reads[:, :self.cut].any()):
            raise ValueError(f"positions before the fixed prefix's end ({self.cut}) have no logits here")
        return logits_at(self.model, reads, self._run)

    def _run(self, last: int) -> torch.Tensor:
        """The model's logits asking for the last ``last`` positions, as the model returns them."""
        import copy

        if self.cut == 0:
            return _model_logits(self.model, self.batch, last)
        b = self.batch
        return self.model.module(input_ids=b.input_ids[:, self.cut:], attention_mask=b.attention_mask,
                                 position_ids=self.positions[:, self.cut:], use_cache=True, logits_to_keep=last,
                                 **{_cache_keyword(self.model.module): copy.deepcopy(self.cache)}).logits


def logits_at(model: Any, reads: torch.Tensor, run: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Logits ``[M, V]`` at the ``M`` positions where ``reads`` (``[B, L]``) is True, in row-major order.

    ``run(last)`` runs the model asking for the logits of its last ``last`` positions (``logits_to_keep``);
    a ``Hooks.replace`` on the unembedding's input hands it only the read positions. Its product with the
    vocabulary, the log-softmax and their backward pass are most of an optimisation step's cost on a large
    vocabulary (Gemma-3: 262k tokens), and rows of unequal target lengths (or the last position, which
    predicts nothing) would otherwise pay for padding. Architectures that reshape the unembedding's output
    are run again without the cut.
    """
    first = int(reads.any(0).nonzero()[0]) if bool(reads.any()) else reads.shape[1] - 1
    last = reads.shape[1] - first
    cut: list[bool] = []

    def keep_reads(hidden: torch.Tensor) -> torch.Tensor | None:
        """The unembedding's input [B, P, d] (its P positions are the last of the sequence) → [1, M, d]."""
        if hidden.dim() != 3 or hidden.shape[0] != reads.shape[0] or not last <= hidden.shape[1] <= reads.shape[1]:
            return None
        cut.append(True)
        return hidden[reads[:, -hidden.shape[1]:]].unsqueeze(0).contiguous()

    with Hooks(model.module) as hooks:
        hooks.replace(model.spec.unembed, "input", keep_reads)
        logits = run(last)
    if len(cut) == 1 and logits.shape[:2] == (1, int(reads.sum())):
        return logits[0]
    if cut:  # an architecture that reshapes the unembedding's output: run again with all positions
        logits = run(last)
    # (uncut: an architecture that reaches its vocabulary otherwise; its logits hold at least ``last`` positions)
    return logits[:, -last:][reads[:, -last:]]


def target_logprobs(model: Any, batch: Batch) -> torch.Tensor:
    """Differentiable ``log P(y_t | prompt, y_<t)`` as ``[B, T]`` aligned right (0 where padded).

    Column ``j`` of the result is the target token at input position ``L - T + j``. The unembedding
    sees only the positions that predict a target token (``logits_at``).
    """
    n = batch.n_target
    targets = batch.input_ids[:, -n:]
    wanted = batch.target_mask[:, -n:]  # [B, n]: which of the last n tokens are targets
    reads = torch.zeros_like(batch.target_mask)  # [B, L]: the positions whose logits predict a target token
    reads[:, -n - 1:-1] = wanted
    logits = logits_at(model, reads, lambda last: _model_logits(model, batch, last))
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[wanted].unsqueeze(-1)).squeeze(-1)
    return torch.zeros(wanted.shape, dtype=logp.dtype, device=logp.device).index_put((wanted,), logp)


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


@dataclass
class PromptScore:
    """Teacher-forced scores of several continuations of one prompt, and its greedy continuation."""

    prompt: str
    continuations: list[ContinuationScore]
    generated_ids: list[int]


def check_prompt(model: Any, prompt: Any) -> None:
    """A ``RequestError`` unless ``model`` is an ``lmedit.Model`` and ``prompt`` is non-empty text."""
    require_model(model, RequestError)
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(f"the prompt must be non-empty text, got {type(prompt).__name__} {str(prompt)[:60]!r}")


def check_texts(values: Any, what: str, accepted: str = "a list of strings") -> list[str]:
    """``values`` as a list of strings, or a ``RequestError`` naming ``what`` was wrong."""
    if isinstance(values, str) or not isinstance(values, Sequence) or not all(isinstance(v, str) for v in values):
        raise RequestError(f"{what} must be {accepted}, got {type(values).__name__} {str(values)[:60]!r}")
    return list(values)


@torch.no_grad()
def score_prompts(model: Any, prompts: Sequence[str], targets: Sequence[Sequence[str]],
                  greedy: int | Sequence[int] = 0, batch_size: int = 64) -> list[PromptScore]:
    """Score several continuations per prompt and greedy-decode, running each prompt **once**.

    Each batch of prompts is prefilled once with a KV cache. A continuation ``y`` is then scored by
    feeding ``y[:-1]`` after the cached prompt (``P(y_0)`` comes from the prompt's last logits, so a
    one-token answer costs no extra pass) and the cache is cropped back; greedy decoding runs from the
    same cache. ``greedy`` is the number of tokens to generate per prompt (EOS ends a row early).
    This is the evaluation hot path: a prompt with its answer, its competing answer and a generation
    costs one prompt pass plus a few single-token steps. Prompts are batched by how many tokens they
    generate, then by their longest continuation, then by length: each decoding or teacher-forcing step
    of a batch computes the full vocabulary's logits for every row as long as its widest one, so mixing
    a 20-token answer with 3-token ones multiplies the work (ordering by prompt length alone took 1.8×
    as long on 100 ZsRE cases of SmolLM2 and 1.9× on 50 of Gemma-3, same scores).
    """
    require_model(model, RequestError)
    check_texts(prompts, "prompts")
    if len(targets) != len(prompts):
        raise RequestError(f"{len(prompts)} prompts but {len(targets)} target lists")
    wants = [greedy] * len(prompts) if isinstance(greedy, int) else list(greedy)
    encoded = [_prompt_ids(model, p) for p in prompts]
    conts = [[_continuation_ids(model, text, ids, t) for t in ts] for (text, ids), ts in zip(encoded, targets)]
    longest = [max((len(c) for c in cs), default=1) for cs in conts]
    # batch rows that decode and continue for as long as each other: every step of a batch runs its widest row
    order = sorted(range(len(prompts)), key=lambda i: (wants[i], longest[i], len(encoded[i][1])))
    out: list[PromptScore | None] = [None] * len(prompts)
    for idx in _logit_bounded_batches(order, [longest[i] for i in order], batch_size, _vocab_size(model)):
        scores, generated = _score_batch(model, [encoded[i][1] for i in idx], [conts[i] for i in idx],
                                         [wants[i] for i in idx])
        for b, i in enumerate(idx):
            cs = [ContinuationScore(prompts[i], t, *sc) for t, sc in zip(targets[i], scores[b])]
            out[i] = PromptScore(prompts[i], cs, generated[b])
    return out  # type: ignore[return-value]


LOGITS_BUDGET = 2 ** 27
"""Most logits (batch rows × continuation tokens × vocabulary) one scoring step materialises: 512 MiB in
float32, about three times that at the step's peak (logits, their float copy, log-softmax). A 262k-token
vocabulary (Gemma-3) with 64 long continuations would otherwise need several GiB per step."""


def _logit_bounded_batches(order: list[int], lengths: list[int], batch_size: int, vocab: int) -> list[list[int]]:
    """``order`` cut into consecutive batches of at most ``batch_size`` prompts whose rows × longest
    continuation × ``vocab`` stays within ``LOGITS_BUDGET`` (a single prompt always forms a batch)."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in zip(order, lengths):
        widest = max(longest, n)
        if current and (len(current) == batch_size or (len(current) + 1) * widest * vocab > LOGITS_BUDGET):
            batches.append(current)
            current, widest = [], n
        current.append(i)
        longest = widest
    return batches + ([current] if current else [])


def _vocab_size(model: Any) -> int:
    """Rows of the output embedding (the logits' last dimension)."""
    return int(get_module(model.module, model.spec.unembed).weight.shape[0])


def _score_batch(model: Any, prompt_ids: list[list[int]], conts: list[list[list[int]]], greedy: list[int]
                 ) -> tuple[list[list[tuple[list[int], list[float], list[int]]]], list[list[int]]]:
    """One prefill for a batch of prompts, then the continuations and greedy steps from its cache."""
    import copy

    device, pad = model.device, model.tokenizer.pad_token_id
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for b, p in enumerate(prompt_ids):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    lengths = mask.sum(1)
    cache_kw = _cache_keyword(model.module)
    prefill = model.module(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                           use_cache=True, logits_to_keep=1)
    cache = getattr(prefill, "cache", None) or prefill.past_key_values
    last = prefill.logits[:, -1].float()
    croppable = getattr(cache, "is_croppable", True) is not False and hasattr(cache, "crop")
    snapshot = None if croppable else copy.deepcopy(cache)

    def step(tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` [B, m] (``valid`` marks real ones) after the cached prompt; logits [B, m, V]."""
        ext = torch.cat([mask, valid.long()], dim=1)
        pos = lengths[:, None] + torch.arange(tokens.shape[1], device=device)[None]
        return model.module(input_ids=tokens, attention_mask=ext, position_ids=pos, use_cache=True,
                            **{cache_kw: cache}).logits.float()

    def rewind() -> None:
        nonlocal cache
        if croppable:
            cache.crop(-(cache.get_seq_length() - width))  # a negative count removes that many tokens
        else:
            cache = copy.deepcopy(snapshot)

    last_logp = torch.log_softmax(last, dim=-1)
    results: list[list[tuple[list[int], list[float], list[int]]]] = [[] for _ in prompt_ids]
    for j in range(max((len(c) for c in conts), default=0)):
        rows = [c[j] if j < len(c) else [] for c in conts]
        m = max(len(r) for r in rows)
        logps, argmaxes = [last_logp], [last.argmax(-1, keepdim=True)]
        if m > 1:  # feed y_0 .. y_{m-2} to get the distributions of y_1 .. y_{m-1}
            tokens = torch.full((len(rows), m - 1), pad, dtype=torch.long)
            valid = torch.zeros((len(rows), m - 1), dtype=torch.bool)
            for b, r in enumerate(rows):
                tokens[b, : max(0, len(r) - 1)] = torch.tensor(r[:-1], dtype=torch.long)
                valid[b, : max(0, len(r) - 1)] = True
            logits = step(tokens.to(device), valid.to(device))
            rewind()
            logps.append(torch.log_softmax(logits, dim=-1))
            argmaxes.append(logits.argmax(-1))
        argmax_all = torch.cat(argmaxes, dim=1)
        for b, r in enumerate(rows):
            if j >= len(conts[b]):
                continue
            token_lp = [float(logps[0][b, r[0]])] + [float(logps[1][b, k - 1, r[k]]) for k in range(1, len(r))]
            results[b].append((r, token_lp, argmax_all[b, : len(r)].tolist()))
    generated: list[list[int]] = [[] for _ in prompt_ids]
    k = max(greedy, default=0)
    if k:
        stop = torch.tensor(_eos_ids(model) or [-1], device=device)
        token = last.argmax(-1, keepdim=True)
        finished = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
        for t in range(k):
            for b in range(len(prompt_ids)):
                if not finished[b] and t < greedy[b]:
                    generated[b].append(int(token[b, 0]))
            finished |= torch.isin(token[:, 0], stop)
            if t == k - 1 or bool(finished.all()):
                break
            # feed the newest token; the cache holds the prompt and the t tokens before it
            ext = torch.cat([mask, torch.ones((len(prompt_ids), t + 1), dtype=torch.long, device=device)], dim=1)
            logits = model.module(input_ids=token, attention_mask=ext, position_ids=(lengths + t)[:, None],
                                   use_cache=True, **{cache_kw: cache}).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
        rewind()
        stops = set(stop.tolist())
        generated = [g[: next((i for i, x in enumerate(g) if x in stops), len(g))] for g in generated]
    return results, generated


def _cache_keyword(module: Any) -> str:
    """The forward() keyword of the KV cache: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def score_continuations(model: Any, prompts: Sequence[str], targets: Sequence[str],
                        batch_size: int = 64) -> list[ContinuationScore]:
    """Teacher-forced scores of ``targets`` after ``prompts`` (one target per prompt)."""
    check_texts(prompts, "prompts")
    check_texts(targets, "targets")
    if len(targets) != len(prompts):
        raise RequestError(f"{len(prompts)} prompts but {len(targets)} targets")
    return [ps.continuations[0] for ps in score_prompts(model, prompts, [[t] for t in targets], 0, batch_size)]


def generate_ids(model: Any, prompts: Sequence[str], max_new_tokens: int = 20, batch_size: int = 64) -> list[list[int]]:
    """Token ids of the greedy continuations of ``prompts`` (new tokens only, up to EOS excluded)."""
    return [ps.generated_ids for ps in score_prompts(model, prompts, [[] for _ in prompts], max_new_tokens, batch_size)]


def _eos_ids(model: Any) -> list[int]:
    eos = getattr(model.module.generation_config, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos]
    return [i for i in ids + [model.tokenizer.eos_token_id] if i is not None]


def generate(model: Any, prompts: str | Sequence[str], max_new_tokens: int = 20, batch_size: int = 32,
             **generate_kwargs: Any) -> str | list[str]:
    """Continuations of ``prompts`` (only the new text, special tokens removed).

    Greedy by default (through ``score_prompts``); any ``generate_kwargs`` (e.g. ``do_sample=True``)
    go to Hugging Face's ``generate`` instead.
    """
    require_model(model, RequestError)
    single = isinstance(prompts, str)
    items = [prompts] if single else check_texts(prompts, "prompts", "a string or a list of strings")
    rows = generate_ids(model, items, max_new_tokens, batch_size) if not generate_kwargs else \
        _hf_generate_ids(model, items, max_new_tokens, batch_size, **generate_kwargs)
    out = [model.tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    return out[0] if single else out


@torch.no_grad()
def _hf_generate_ids(model: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                     **kwargs: Any) -> list[list[int]]:
    out: list[list[int]] = []
    stop = set(_eos_ids(model))
    for start in range(0, len(prompts), batch_size):
        batch = encode(model, prompts[start:start + batch_size])
        ids = model.module.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    max_new_tokens=max_new_tokens, pad_token_id=model.tokenizer.pad_token_id, **kwargs)
        for row in ids[:, batch.input_ids.shape[1]:].tolist():
            out.append(row[: next((j for j, t in enumerate(row) if t in stop), len(row))])
    return out
