"""Knowledge attribution: integrated gradients over every MLP neuron for one fact.

``IG_i = a_i · ∫₀¹ ∂P(y | a ← α·a)/∂a_i dα`` for the neurons (keys of ``W_out``) of each layer at the
prompt's last token (the computation is ``methods.knowledge_neurons.neuron_attributions``, shared with
knowledge-neuron editing). By the completeness property of integrated gradients, a layer's scores sum
to ``P(y | x) − P(y | x; that layer's neurons zeroed)`` (up to the Riemann-sum error).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmedit.inspect.lens import printable
from lmedit.errors import RequestError
from lmedit.scoring import check_prompt, encode, forward_logits


@dataclass
class Attribution:
    prompt: str
    answer: str
    scores: torch.Tensor  # [n_layers, d_mlp]

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` neurons with the largest scores as (layer, neuron, score)."""
        flat = self.scores.flatten()
        values, idx = flat.topk(k)
        d = self.scores.shape[1]
        return [(int(i) // d, int(i) % d, round(float(v), 6)) for v, i in zip(values, idx)]

    def by_layer(self) -> torch.Tensor:
        """Total attribution per layer (the layer's share of P(answer), by completeness)."""
        return self.scores.sum(1)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, "by_layer": [round(float(x), 6) for x in self.by_layer()],
                "top": self.top(20)}

    def plot(self, path: str | Path | None = None) -> Any:
        """Per-layer total attribution (bars) and the top neurons (labels)."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.5))
        totals = self.by_layer().numpy()
        ax.bar(range(len(totals)), totals, color=["tab:green" if t >= 0 else "tab:red" for t in totals])
        ax.set_xlabel("layer")
        ax.set_ylabel("Σ IG over the layer's neurons")
        top = ", ".join(f"L{layer}.{n}" for layer, n, _ in self.top(5))
        ax.set_title(f"integrated gradients for P({printable(self.answer.strip())!r}); top neurons {top}", fontsize=9)
        if path is not None:
            fig.tight_layout()
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return ax


def neuron_attribution(model: Any, prompt: str, answer: str | None = None, steps: int = 20) -> Attribution:
    """Integrated gradients of every MLP neuron of every layer for ``answer`` (default: the model's own
    next token) after ``prompt``."""
    from lmedit.methods.knowledge_neurons import first_token, neuron_attributions

    check_prompt(model, prompt)
    if not isinstance(steps, int) or steps < 1:
        raise RequestError(f"integrated gradients need at least 1 step, not {steps!r}")
    if answer is None:
        answer_id = int(forward_logits(model, encode(model, [prompt]), last=1)[0, -1].argmax())
        answer = model.tokenizer.decode([answer_id])
    else:
        answer_id = first_token(model, prompt, answer)
    with torch.enable_grad():
        scores = neuron_attributions(model, [prompt], [answer_id], list(range(model.spec.n_layers)), steps)[0]
    return Attribution(prompt, answer, scores.detach().cpu())
