"""Causal tracing (Meng et al. 2022): which hidden states carry a fact.

Three runs of a prompt ``x`` whose answer's first token is ``y``:

* clean: ``p_clean = P(y | x)``, every hidden state recorded;
* corrupted: Gaussian noise ``ε ~ N(0, ν²)`` added to the subject's token embeddings,
  ``p_corrupt = E_ε P(y | x, ε)``; ``ν = noise`` × the standard deviation of the token embeddings'
  entries (ROME: 3 × the embeddings' standard deviation);
* corrupted-with-restoration: as corrupted, but one state put back to its clean value:
  ``p(t, l) = E_ε P(y | x, ε, h_t^l ← clean)``.

The **indirect effect** of state ``(t, l)`` is ``p(t, l) − p_corrupt``. ``kind`` says which state is
restored: ``"hidden"`` the block output (residual stream) at layer ``l``; ``"mlp"`` / ``"attn"`` the
MLP / attention outputs of the ``window`` layers centred on ``l`` (ROME's setting: 10), which
isolates the contribution of those modules. The noise samples are fixed by ``seed`` and shared by
all restorations, so differences between cells are not sampling noise.

For each layer, all tokens × samples run as one batch: ``n_layers`` batched passes in all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lmedit.errors import RequestError
from lmedit.hooks import Hooks
from lmedit.inspect.lens import printable
from lmedit.models.spec import get_module
from lmedit.scoring import Batch, check_prompt, encode, forward_logits, tokenize

Kind = Literal["hidden", "mlp", "attn"]
ROLE = {"hidden": "block", "mlp": "mlp_out", "attn": "attn_out"}


@dataclass
class Trace:
    """The result of ``causal_trace``: ``scores[t, l]`` = P(answer) with state (t, l) restored."""

    prompt: str
    answer: str
    tokens: list[str]
    subject: tuple[int, int]  # token range [start, end) of the subject
    kind: str
    scores: torch.Tensor  # [n_tokens, n_layers]
    clean: float
    corrupted: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def effect(self) -> torch.Tensor:
        """Indirect effects ``scores − corrupted``."""
        return self.scores - self.corrupted

    def best_layer(self, token: int | None = None) -> int:
        """The layer with the largest effect at ``token`` (default: the subject's last token)."""
        return int(self.effect[self.subject[1] - 1 if token is None else token].argmax())

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, "tokens": self.tokens, "subject": list(self.subject),
                "kind": self.kind, "clean": self.clean, "corrupted": self.corrupted,
                "scores": [[round(float(x), 5) for x in row] for row in self.scores], "settings": self.settings}

    def plot(self, path: str | Path | None = None, ax: Any = None) -> Any:
        """A heatmap of P(answer) per (token, layer) — the familiar causal-trace figure."""
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(max(4.0, 0.22 * self.scores.shape[1] + 2), 0.3 * len(self.tokens) + 1.5))
        cmap = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}[self.kind]
        image = ax.pcolormesh(self.scores.numpy(), cmap=cmap, vmin=self.corrupted)
        ax.invert_yaxis()
        ax.set_yticks([i + 0.5 for i in range(len(self.tokens))])
        ax.set_yticklabels([printable(t) + ("*" if self.subject[0] <= i < self.subject[1] else "")
                            for i, t in enumerate(self.tokens)])
        ax.set_xlabel(f"layer ({self.kind} restored" + (f", window {self.settings.get('window')})" if self.kind != "hidden" else ")"))
        ax.set_title(f"P({self.answer.strip()!r}) after restoring one state; clean {self.clean:.3f}, corrupted {self.corrupted:.3f}",
                     fontsize=9)
        ax.figure.colorbar(image, ax=ax)
        if path is not None:
            ax.figure.tight_layout()
            ax.figure.savefig(path, dpi=120)
            if fig is not None:
                plt.close(fig)
        return ax


def subject_token_range(model: Any, prompt: str, subject: str) -> tuple[int, int]:
    """Token range ``[start, end)`` of the first occurrence of ``subject`` in ``prompt`` (BOS counted)."""
    start_char = prompt.find(subject)
    if start_char < 0:
        raise RequestError(f"the subject {subject!r} does not occur in the prompt {prompt!r}")
    end_char = start_char + len(subject)
    _, offsets = tokenize(model, model.format_prompt(prompt))
    shift = max(0, model.format_prompt(prompt).rfind(prompt))
    covered = [i for i, (s, e) in enumerate(offsets) if e > s and s < end_char + shift and e > start_char + shift]
    if not covered:
        raise RequestError(f"no token of {prompt!r} covers the subject {subject!r}")
    return covered[0], covered[-1] + 1


@torch.no_grad()
def causal_trace(model: Any, prompt: str, subject: str, answer: str | None = None, *, kind: Kind = "hidden",
                 samples: int = 10, noise: float = 3.0, window: int = 10, seed: int = 0) -> Trace:
    """Trace which states carry ``prompt``'s answer (see the module docstring).

    ``answer`` defaults to the model's own greedy next token. Returns a ``Trace``.
    """
    check_prompt(model, prompt)
    if kind not in ROLE:
        raise RequestError(f"kind must be one of {', '.join(ROLE)}, not {kind!r}")
    spec = model.spec
    batch = encode(model, [prompt])
    ids = batch.input_ids[0].tolist()
    n_tok, n_layers = len(ids), spec.n_layers
    if answer is None:
        answer_id = int(forward_logits(model, batch, last=1)[0, -1].argmax())
        answer = model.tokenizer.decode([answer_id])
    else:
        with_answer = encode(model, [prompt], [answer])
        answer_id = int(with_answer.input_ids[0][with_answer.target_mask[0]][0])
    start, end = subject_token_range(model, prompt, subject)
    embed = get_module(model.module, spec.embed)
    sample_ids = torch.arange(min(embed.weight.shape[0], 20_000), device=model.device)
    scale = noise * float(embed(sample_ids).float().std())  # of the embedding *outputs* (Gemma scales them)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    eps = (torch.randn((samples, end - start, spec.hidden_size), generator=generator) * scale).to(model.device)

    # clean run: the states to restore, at every layer and token
    paths = [spec.path(layer, ROLE[kind]) for layer in range(n_layers)]
    with Hooks(model.module) as hooks:
        keys = [hooks.read(path, "output") for path in paths]
        clean_logits = forward_logits(model, batch, last=1)
        clean_states = [hooks[key][0].clone() for key in keys]  # each [T, d]
    p_clean = float(torch.softmax(clean_logits[0, -1].float(), -1)[answer_id])

    def corrupt(rows: int):
        def fn(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[:, start:end] += eps.repeat(rows // samples, 1, 1).to(x.dtype)
            return x
        return fn

    def prob(b: Batch) -> torch.Tensor:
        return torch.softmax(forward_logits(model, b, last=1)[:, -1].float(), -1)[:, answer_id]

    with Hooks(model.module) as hooks:
        hooks.replace(spec.embed, "output", corrupt(samples))
        p_corrupt = float(prob(_repeat(batch, samples)).mean())

    # one batch per layer: row (t, s) restores token t under noise sample s
    big = _repeat(batch, n_tok * samples)
    token_of_row = torch.arange(n_tok, device=model.device).repeat_interleave(samples)
    rows = torch.arange(n_tok * samples, device=model.device)
    scores = torch.zeros((n_tok, n_layers))
    half = window // 2
    for layer in range(n_layers):
        lo, hi = (layer, layer + 1) if kind == "hidden" else (max(0, layer - half), min(n_layers, layer - half + window))
        with Hooks(model.module) as hooks:
            hooks.replace(spec.embed, "output", corrupt(n_tok * samples))
            for restored in range(lo, hi):
                def put_back(out: torch.Tensor, clean: torch.Tensor = clean_states[restored]) -> torch.Tensor:
                    out = out.clone()
                    out[rows, token_of_row] = clean[token_of_row].to(out.dtype)
                    return out

                hooks.replace(paths[restored], "output", put_back)
            scores[:, layer] = prob(big).reshape(n_tok, samples).mean(1).cpu()
    tokens = [model.tokenizer.decode([i]) for i in ids]
    return Trace(prompt, answer, tokens, (start, end), kind, scores, p_clean, p_corrupt,
                 {"samples": samples, "noise": noise, "noise_std": scale, "window": window, "seed": seed})


def _repeat(batch: Batch, n: int) -> Batch:
    rep = lambda t: t.repeat(n, 1)  # noqa: E731
    return Batch(rep(batch.input_ids), rep(batch.attention_mask), rep(batch.target_mask),
                 batch.prompt_lengths * n, batch.target_lengths * n)


def suggest_layers(model: Any, prompt: str, subject: str, answer: str | None = None, span: int = 5,
                   **kwargs: Any) -> dict[str, Any]:
    """Edit layers for a new architecture from an MLP causal trace at the subject's last token.

    ROME's layer: the layer whose MLP window has the largest indirect effect there; MEMIT's layers:
    the ``span`` layers ending at it (the critical range the MEMIT paper edits).
    """
    trace = causal_trace(model, prompt, subject, answer, kind="mlp", **kwargs)
    best = trace.best_layer()
    return {"rome_layer": best, "memit_layers": list(range(max(0, best - span + 1), best + 1)),
            "effect_by_layer": [round(float(x), 5) for x in trace.effect[trace.subject[1] - 1]], "trace": trace}
