"""Logit lens: read each layer's residual stream as if it were the last.

For block output ``h_t^l`` (layer ``l``, position ``t``) the lens distribution is
``softmax(U · norm(h_t^l))`` with ``norm`` the model's final norm and ``U`` its unembedding (and the
model's final logit soft-capping, if it has one). At the last layer this is exactly the model's own
output distribution.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmedit.hooks import Hooks
from lmedit.models.spec import get_module
from lmedit.scoring import check_prompt, encode, forward_logits


def printable(text: str) -> str:
    """A token's text for a figure label: newlines as ``\\n``, other control characters as ``·``."""
    return "".join(c if c.isprintable() else ("\\n" if c == "\n" else "·") for c in text)


@dataclass
class Lens:
    """``top_ids[l, t, k]`` / ``top_probs`` per layer and position; ``final_prob[l, t]`` = lens probability of
    the token the model finally predicts at ``t``."""

    prompt: str
    tokens: list[str]
    top_ids: torch.Tensor  # [L, T, k]
    top_probs: torch.Tensor  # [L, T, k]
    final_ids: torch.Tensor  # [T]
    final_prob: torch.Tensor  # [L, T]
    decode: Any = None

    def top_tokens(self, layer: int, position: int = -1) -> list[tuple[str, float]]:
        return [(self.decode([int(i)]), round(float(p), 4))
                for i, p in zip(self.top_ids[layer, position], self.top_probs[layer, position])]

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "tokens": self.tokens,
                "top": [[self.top_tokens(layer, t) for t in range(len(self.tokens))] for layer in range(self.top_ids.shape[0])],
                "final_tokens": [self.decode([int(i)]) for i in self.final_ids],
                "final_prob": [[round(float(x), 5) for x in row] for row in self.final_prob]}

    def plot(self, path: str | Path | None = None) -> Any:
        """Heatmap: rows are layers, columns positions; each cell shows the lens's top token and is
        coloured by the lens probability of the model's final prediction at that position."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n_layers, n_tok = self.final_prob.shape
        fig, ax = plt.subplots(figsize=(1.1 * n_tok + 2, 0.28 * n_layers + 1.5))
        image = ax.pcolormesh(self.final_prob.numpy(), cmap="Blues", vmin=0, vmax=1)
        for layer in range(n_layers):
            for t in range(n_tok):
                text = printable(self.decode([int(self.top_ids[layer, t, 0])]))[:8]
                ax.text(t + 0.5, layer + 0.5, text, ha="center", va="center", fontsize=6)
        ax.set_xticks([t + 0.5 for t in range(n_tok)])
        ax.set_xticklabels([printable(t) for t in self.tokens], rotation=60, fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title("logit lens: top token per layer; colour = P(final prediction)", fontsize=9)
        fig.colorbar(image, ax=ax)
        if path is not None:
            fig.tight_layout()
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return ax


@torch.no_grad()
def logit_lens(model: Any, prompt: str, k: int = 5) -> Lens:
    """The logit lens of ``prompt`` at every layer and position (see the module docstring)."""
    check_prompt(model, prompt)
    spec = model.spec
    batch = encode(model, [prompt])
    with Hooks(model.module) as hooks:
        keys = [hooks.read(spec.block(layer), "output") for layer in range(spec.n_layers)]
        final = forward_logits(model, batch)[0].float()
        states = torch.stack([hooks[key][0] for key in keys])  # [L, T, d]
    norm = get_module(model.module, spec.final_norm) if spec.final_norm else None
    unembed = get_module(model.module, spec.unembed)
    logits = unembed(norm(states) if norm is not None else states).float()
    cap = getattr(getattr(model.module, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    probs = torch.softmax(logits, dim=-1)
    top_probs, top_ids = probs.topk(k, dim=-1)
    final_ids = final.argmax(-1)
    final_prob = probs.gather(-1, final_ids[None, :, None].expand(probs.shape[0], -1, 1))[..., 0]
    tokens = [model.tokenizer.decode([int(i)]) for i in batch.input_ids[0]]
    return Lens(prompt, tokens, top_ids.cpu(), top_probs.cpu(), final_ids.cpu(), final_prob.cpu(), model.tokenizer.decode)
