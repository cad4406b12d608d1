"""A circuit sketch for a factual prompt: which attention heads move information to the last token.

Each head's **attribution** is gradient × activation at the input of the attention output projection
(where heads are still separate), at the last position:
``A_{l,h} = ⟨∂ log P(y | x) / ∂z_{l,h}, z_{l,h}⟩`` with ``z_{l,h}`` head ``h``'s slice of that input — the
first-order estimate of how much ``log P(y)`` would drop if the head's output at the last token were
removed. Each head's **attention** from the last token over the prompt's positions says where it
reads from. ``plot()`` draws the top heads as a small graph: prompt tokens → heads (edge width =
attention weight) → the answer (edge colour/width = attribution).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmedit.hooks import Hooks
from lmedit.inspect.lens import printable
from lmedit.models.spec import get_module, linear_dims
from lmedit.scoring import check_prompt, encode, forward_logits


@dataclass
class Circuit:
    prompt: str
    answer: str
    tokens: list[str]
    scores: torch.Tensor  # [n_layers, n_heads] attribution of each head at the last position
    attention: torch.Tensor  # [n_layers, n_heads, n_tokens] attention of the last token

    def top_heads(self, k: int = 8) -> list[tuple[int, int, float]]:
        """(layer, head, attribution) of the ``k`` heads with the largest |attribution|."""
        flat = self.scores.flatten()
        idx = flat.abs().topk(min(k, flat.numel())).indices
        h = self.scores.shape[1]
        return [(int(i) // h, int(i) % h, round(float(flat[i]), 5)) for i in idx]

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, "tokens": self.tokens,
                "top_heads": [{"layer": layer, "head": head, "attribution": a,
                               "attention": [round(float(x), 4) for x in self.attention[layer, head]]}
                              for layer, head, a in self.top_heads()],
                "scores": [[round(float(x), 5) for x in row] for row in self.scores]}

    def plot(self, path: str | Path | None = None, k: int = 8, min_attention: float = 0.1) -> Any:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        heads = sorted(self.top_heads(k))
        n_tok = len(self.tokens)
        fig, ax = plt.subplots(figsize=(9, max(3.5, 0.35 * n_tok + 1)))
        token_y = {t: n_tok - 1 - t for t in range(n_tok)}
        layers = sorted({layer for layer, _, _ in heads})
        x_of = {layer: 1 + i for i, layer in enumerate(layers)}
        head_xy = {}
        for layer in layers:  # the heads of a layer spread evenly over the height
            members = [h for lay, h, _ in heads if lay == layer]
            for slot, head in enumerate(members):
                head_xy[(layer, head)] = (x_of[layer], (n_tok - 1) * (slot + 1) / (len(members) + 1))
        answer_xy = (len(layers) + 1.5, (n_tok - 1) / 2)
        biggest = max(abs(a) for _, _, a in heads) or 1.0
        for layer, head, a in heads:
            hx, hy = head_xy[(layer, head)]
            for t in range(n_tok):
                w = float(self.attention[layer, head, t])
                if w >= min_attention:
                    ax.plot([0, hx], [token_y[t], hy], color="tab:blue", alpha=min(1.0, w), lw=3 * w)
            ax.plot([hx, answer_xy[0]], [hy, answer_xy[1]], color="tab:green" if a > 0 else "tab:red",
                    lw=0.5 + 4 * abs(a) / biggest)
            ax.scatter([hx], [hy], s=250, color="white", edgecolors="black", zorder=3)
            ax.text(hx, hy, f"L{layer}H{head}", ha="center", va="center", fontsize=6, zorder=4)
        for t, token in enumerate(self.tokens):
            ax.text(-0.05, token_y[t], printable(token), ha="right", va="center", fontsize=8)
        ax.text(answer_xy[0] + 0.05, answer_xy[1], printable(self.answer), ha="left", va="center", fontsize=10,
                fontweight="bold")
        ax.set_xlim(-1.5, answer_xy[0] + 1)
        ax.axis("off")
        ax.set_title("top heads by attribution (green: raise P(answer)); blue: where each reads from", fontsize=9)
        if path is not None:
            fig.tight_layout()
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return ax


def head_attribution(model: Any, prompt: str, answer: str | None = None) -> Circuit:
    """Attribution and last-token attention of every head (see the module docstring)."""
    check_prompt(model, prompt)
    spec = model.spec
    config = model.module.config
    n_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    batch = encode(model, [prompt])
    if answer is None:
        with torch.no_grad():
            answer_id = int(forward_logits(model, batch, last=1)[0, -1].argmax())
        answer = model.tokenizer.decode([answer_id])
    else:
        from lmedit.methods.knowledge_neurons import first_token

        answer_id = first_token(model, prompt, answer)
    kept: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def fn(t: torch.Tensor) -> None:
            t.retain_grad()
            kept[layer] = t
        return fn

    previous = getattr(config, "_attn_implementation", None)
    model.module.set_attn_implementation("eager")  # attention probabilities are only returned by eager attention
    try:
        with Hooks(model.module) as hooks, torch.enable_grad():
            hooks.replace(spec.embed, "output", lambda t: t.detach().requires_grad_(True))
            for layer in range(spec.n_layers):
                hooks.replace(spec.path(layer, "attn_out"), "input", keep(layer))
            out = model.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                               output_attentions=True)
            logp = torch.log_softmax(out.logits[0, -1].float(), -1)[answer_id]
            logp.backward()
        attention = torch.stack([a[0, :, -1].detach().float().cpu() for a in out.attentions])  # [L, H, T]
    finally:
        if previous is not None:
            model.module.set_attn_implementation(previous)
    scores = torch.zeros(spec.n_layers, n_heads)
    for layer, z in kept.items():
        d_in = linear_dims(get_module(model.module, spec.path(layer, "attn_out")))[0]
        head_dim = d_in // n_heads
        contrib = (z.grad[0, -1] * z[0, -1]).detach().float().reshape(n_heads, head_dim).sum(-1)
        scores[layer] = contrib.cpu()
    tokens = [model.tokenizer.decode([int(i)]) for i in batch.input_ids[0]]
    return Circuit(prompt, answer, tokens, scores, attention)
