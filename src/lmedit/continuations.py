"""Continuations of prompts, scored and generated from one cached prompt pass (evaluation's hot path).

* ``score_prompts``: several teacher-forced continuations per prompt and a greedy continuation, each
  batch of prompts prefilled **once** with a KV cache.
* ``score_continuations``: one target per prompt → log-probability, teacher-forced accuracy.
* ``generate`` / ``generate_ids``: batched greedy generation (``hf_generate_ids`` for sampling through
  Hugging Face's ``generate``).

Tokenisation (``encode``, ``join``) and the differentiable scores used by training losses are in
``lmedit.scoring``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lmedit.errors import RequestError
from lmedit.models.loading import require_model
from lmedit.models.spec import get_module
from lmedit.scoring import cache_keyword, check_texts, continuation_token_ids, encode, prompt_token_ids


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
    encoded = [prompt_token_ids(model, p) for p in prompts]
    conts = [[continuation_token_ids(model, text, ids, t) for t in ts] for (text, ids), ts in zip(encoded, targets)]
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
    cache_kw = cache_keyword(model.module)
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
        hf_generate_ids(model, items, max_new_tokens, batch_size, **generate_kwargs)
    out = [model.tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    return out[0] if single else out


@torch.no_grad()
def hf_generate_ids(model: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                    **kwargs: Any) -> list[list[int]]:
    """Token ids of continuations from Hugging Face's ``generate`` with ``kwargs`` (e.g. sampling), new
    tokens only, up to EOS excluded."""
    out: list[list[int]] = []
    stop = set(_eos_ids(model))
    for start in range(0, len(prompts), batch_size):
        batch = encode(model, prompts[start:start + batch_size])
        ids = model.module.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    max_new_tokens=max_new_tokens, pad_token_id=model.tokenizer.pad_token_id, **kwargs)
        for row in ids[:, batch.input_ids.shape[1]:].tolist():
            out.append(row[: next((j for j, t in enumerate(row) if t in stop), len(row))])
    return out
