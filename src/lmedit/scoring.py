"""Scoring primitives shared by every method and metric.

* ``join(prompt, target)``: the one rule for where a continuation starts (a space is inserted when
  neither side has one), so ``"Paris"`` and ``" Paris"`` score the same.
* ``encode``: tokenise (prompt, target) pairs **jointly** — the target's tokens are those of
  ``prompt + target`` after the prompt's own tokens, exactly as the model would see the text; the
  tokenizer's BOS handling is kept; batches are left-padded with explicit position ids.
* ``target_logprobs``: differentiable per-token ``log P(y_t | prompt, y_<t)`` (used for training losses),
  unembedding only the positions the loss reads (``logits_at``, ``FixedPrefix``); ``token_logprobs``
  turns those logits into the targets' log-probabilities without a full float32 log-softmax.
* ``check_prompt`` / ``check_texts``: the clear errors for bad prompts.

Scoring under ``no_grad`` and generation (evaluation's hot path) are in ``lmedit.continuations``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.autograd.function import once_differentiable

from lmedit.errors import RequestError
from lmedit.hooks import Hooks
from lmedit.models.loading import require_model


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


def prompt_token_ids(model: Any, prompt: str) -> tuple[str, list[int]]:
    """(the prompt as the model sees it, its token ids)."""
    text = model.format_prompt(prompt)
    ids = _tokenize(model, text)
    if not ids:
        raise RequestError(f"the prompt {prompt!r} tokenises to nothing")
    return text, ids


def continuation_token_ids(model: Any, text: str, p_ids: list[int], target: str) -> list[int]:
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
        text, p_ids = prompt_token_ids(model, prompt)
        rows.append((p_ids, [] if targets is None else continuation_token_ids(model, text, p_ids, targets[i])))
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


def cache_keyword(module: Any) -> str:
    """The forward() keyword of the KV cache: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


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
                                 **{cache_keyword(self.model.module): copy.deepcopy(self.cache)}).logits


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


# Elements of the float32 log-softmax worked on at once by ``token_logprobs``: ~4 MB keeps a chunk in a CPU
# core's cache (4 rows of Gemma-3's 262k-token vocabulary); on a GPU, a bound on the temporary memory.
_LOGPROB_CHUNK = {"cpu": 2**20}
_LOGPROB_CHUNK_OTHER = 2**26


class _TokenLogprobs(torch.autograd.Function):
    """``log softmax(z)_y`` row by row, in float32, a cache-sized chunk of rows at a time; backward
    ``∂/∂z = g · (onehot(y) − softmax(z))``, recomputed per chunk. Neither pass keeps a float32 copy of
    the ``[N, V]`` logits or their log-probabilities (the unfused ``log_softmax(z.float()).gather(y)``
    writes and re-reads several: 4x the time on 250 rows of a 262k-token vocabulary, ~7 % of a Gemma-3
    bfloat16 WISE step; ``benchmarks/token_logprobs.py``)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        rows = _chunk_rows(logits)
        for i in range(0, logits.shape[0], rows):
            logp = torch.log_softmax(logits[i:i + rows].float(), dim=-1)
            out[i:i + rows] = logp.gather(-1, targets[i:i + rows, None])[:, 0]
        ctx.save_for_backward(logits, targets)
        return out

    @staticmethod
    @once_differentiable  # a second derivative would need the recomputation's graph; none of the methods asks
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        logits, targets = ctx.saved_tensors
        result = torch.empty_like(logits)
        rows = _chunk_rows(logits)
        for i in range(0, logits.shape[0], rows):
            g = grad[i:i + rows, None].float()
            part = torch.softmax(logits[i:i + rows].float(), dim=-1).mul_(-g)
            result[i:i + rows] = part.scatter_add_(-1, targets[i:i + rows, None], g)
        return result, None


def _chunk_rows(logits: torch.Tensor) -> int:
    budget = _LOGPROB_CHUNK.get(logits.device.type, _LOGPROB_CHUNK_OTHER)
    return max(1, budget // max(1, logits.shape[-1]))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Differentiable ``log P(y_i) = z_{i,y_i} − log Σ_v exp z_{i,v}`` per row of ``logits`` ``[N, V]``
    (any float dtype; computed in float32) for ``targets`` ``[N]``: float32 ``[N]``. The same values and
    gradient as ``log_softmax(logits.float()).gather(-1, targets)``, in less time and memory."""
    return _TokenLogprobs.apply(logits, targets)


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
    logp = token_logprobs(logits, targets[wanted])
    return torch.zeros(wanted.shape, dtype=logp.dtype, device=logp.device).index_put((wanted,), logp)


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
