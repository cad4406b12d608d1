"""Knowledge neurons (Dai et al. 2022): find the MLP neurons that express a fact, then rewrite their values.

**Attribution.** For a prompt ``x`` whose answer's first token is ``y``, and the intermediate activation
``a`` of one layer's MLP (the key of ``W_out``) at the prompt's last token, neuron ``i``'s integrated
gradient is

    IG_i = a_i · ∫₀¹ ∂P(y | x; a ← α·a) / ∂a_i dα  ≈  a_i · (1/m) Σ_{j=1..m} ∂P(y | x; a ← (j/m)·a) / ∂a_i

(a Riemann sum with ``m = steps`` points; the other layers keep their values). All ``m`` points and all
of a fact's prompts (the prompt and its rephrases) run as one batch, one layer at a time.

**Selection.** Per prompt, keep neurons (over all layers) whose score exceeds ``threshold`` × that
prompt's maximum; keep the neurons kept for at least ``p`` of the fact's prompts. The paper starts at
p = 0.7 and moves it by 0.05 until the number of knowledge neurons lies in [2, 5] (it did so for the
average over its facts); here it is done per fact (``neurons = (2, 5)``): of p ∈ {0.05, 0.10, …, 1}, the
one nearest ``share`` whose count lies in the band, else the one whose count comes nearest the band —
never an empty set when some p gives neurons. With a fixed p = 0.7, 22 % of SmolLM2's first 50
CounterFact facts (a prompt and two paraphrases: p = 0.7 asks for all three) had no neuron at all.

**Editing.** A neuron's value vector is its column of ``W_out``. For every kept neuron
``v_i ← v_i − λ₁ · e(y_old) + λ₂ · e(y_new)``, with ``e`` the output embedding (unembedding row) of
an answer's first token; per layer this is the rank-one change ``(λ₂ e_new − λ₁ e_old) 1_Sᵀ``.
Published settings: m = 20, threshold 0.2, share 0.7, λ₁ = 1, λ₂ = 8. The old answer is
``target_true``, or the model's own greedy first token when the request has none.

**Signed update (lmedit's change for gated MLPs).** A neuron writes ``a_i · v_i`` into the stream. In
BERT's GELU MLP, where the rule was made, the knowledge neurons' activations are positive, so adding
``e(y_new)`` to ``v_i`` moves the output toward the new answer. In a SwiGLU MLP ``a_i = silu(g_i)·u_i``
is as often negative, and then the same change moves the output *away* from it: on SmolLM2's first
six CounterFact facts 12 of the 21 selected neurons had a negative activation at the prompt's last
token. The update is therefore ``v_i ← v_i + s_i (λ₂ e(y_new) − λ₁ e(y_old))`` with ``s_i`` the sign
of the neuron's mean activation over the fact's prompts — the paper's rule wherever ``a_i > 0``
(``signed=False`` applies it literally).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lmedit.errors import EditError
from lmedit.hooks import Hooks, ReplayBelow
from lmedit.methods.base import HParams, Method, Stopwatch
from lmedit.methods.solvers import as_weight_delta
from lmedit.models.spec import get_module
from lmedit.patch import Component
from lmedit.requests import EditRequest
from lmedit.scoring import Batch, FixedPrefix, encode, forward_logits


@dataclass
class KNHParams(HParams):
    """Hyper-parameters of knowledge-neuron editing (see the module docstring).

    Attributes:
        steps: Riemann-sum points of the integral.  threshold: fraction of a prompt's maximum score.
        share: fraction ``p`` of the fact's prompts a neuron must be kept for (the starting point when
            ``neurons`` is set).
        neurons: ``(low, high)``, the band of knowledge-neuron counts ``p`` is moved toward, in steps of
            0.05 (see the module docstring); ``None``: ``share`` as given.
        erase, enhance: λ₁ and λ₂.  layers: layers searched (default: all).
        max_neurons: keep at most this many (the highest-scoring); ``None``: no cap.
        signed: multiply each neuron's change by the sign of its activation (see the module docstring).
    """

    steps: int = 20
    threshold: float = 0.2
    share: float = 0.7
    neurons: tuple[int, int] | None = (2, 5)
    erase: float = 1.0
    enhance: float = 8.0
    layers: tuple[int, ...] | None = None
    max_neurons: int | None = None
    signed: bool = True

    def _defaults(self, model: Any) -> dict[str, Any]:
        return {"layers": tuple(range(model.spec.n_layers))}


def first_token(model: Any, prompt: str, answer: str) -> int:
    """The id of ``answer``'s first token as it continues ``prompt`` (the scoring space rule applies)."""
    batch = encode(model, [prompt], [answer])
    return int(batch.input_ids[0][batch.target_mask[0]][0])


def last_token_activations(model: Any, prompts: Sequence[str], layers: Sequence[int]) -> torch.Tensor:
    """The MLP neurons' activations (the keys of ``W_out``) at each prompt's last token:
    ``[len(prompts), len(layers), d_mlp]``, float32."""
    batch = encode(model, list(prompts))
    with torch.no_grad(), Hooks(model.module) as hooks:
        keys = [hooks.read(model.spec.path(layer, "mlp_out"), "input") for layer in layers]
        FixedPrefix(model, batch, batch.input_ids.shape[1] - 1).logits(1)
        return torch.stack([hooks[key][:, -1].float() for key in keys], dim=1)


def neuron_attributions(model: Any, prompts: Sequence[str], answer_ids: Sequence[int], layers: Sequence[int],
                        steps: int = 20, activations: torch.Tensor | None = None) -> torch.Tensor:
    """Integrated gradients ``[len(prompts), len(layers), d_mlp]`` of the MLP neurons of ``layers`` at each
    prompt's last token for ``P(answer_id | prompt)`` (see the module docstring). ``activations``: the
    neurons' clean activations (``last_token_activations``) when the caller already has them.

    Scaling an activation at the last token changes nothing before it, so the prompts' prefixes run
    once (a KV cache, ``FixedPrefix``) and each layer's ``steps`` points cost one single-token pass;
    nor does it change the blocks below its layer, so with the layers taken in ascending order each
    block's clean output is computed once and replayed (``ReplayBelow``).
    """
    batch = encode(model, list(prompts))
    n, width = batch.input_ids.shape
    paths = [model.spec.path(layer, "mlp_out") for layer in layers]
    if activations is None:
        activations = last_token_activations(model, prompts, layers)
    per_layer = activations.unbind(1)  # each [n, d_mlp]
    repeat = lambda t: t.repeat_interleave(steps, 0)  # noqa: E731
    points = Batch(repeat(batch.input_ids), repeat(batch.attention_mask), repeat(batch.target_mask),
                   [p for p in batch.prompt_lengths for _ in range(steps)], [t for t in batch.target_lengths for _ in range(steps)])
    runner = FixedPrefix(model, points, width - 1)
    alphas = torch.arange(1, steps + 1, device=model.device, dtype=torch.float32) / steps
    targets = torch.tensor(list(answer_ids), device=model.device).repeat_interleave(steps)
    rows = torch.arange(len(targets), device=model.device)
    blocks = get_module(model.module, model.spec.blocks)
    scores: list[torch.Tensor] = [torch.empty(0)] * len(paths)
    with ReplayBelow(blocks, max(model.spec._layer(layer) for layer in layers)) as below:
        for j in sorted(range(len(paths)), key=lambda j: model.spec._layer(layers[j])):
            a = per_layer[j]
            scaled = (alphas[None, :, None] * a[:, None, :]).reshape(n * steps, -1).requires_grad_(True)

            def swap(t: torch.Tensor, scaled: torch.Tensor = scaled) -> torch.Tensor:
                return torch.cat([t[:, :-1], scaled.to(t.dtype)[:, None, :]], dim=1)

            below.bound = model.spec._layer(layers[j])
            with Hooks(model.module) as hooks, torch.enable_grad():
                hooks.replace(paths[j], "input", swap)
                probs = torch.softmax(runner.logits(1)[:, -1].float(), dim=-1)
                (grad,) = torch.autograd.grad(probs[rows, targets].sum(), scaled)
            scores[j] = a * grad.reshape(n, steps, -1).mean(1)
    return torch.stack(scores, dim=1)


class KnowledgeNeurons(Method):
    """KN: integrated-gradients attribution of MLP neurons, then their value vectors rewritten."""

    name = "kn"
    HParams = KNHParams

    def touched(self, model: Any, hp: KNHParams, requests: Sequence[EditRequest]) -> list[str]:
        return []  # compute() builds the deltas without writing to the model

    def compute(self, model: Any, hp: KNHParams, requests: Sequence[EditRequest],
                originals: dict[str, torch.Tensor]) -> tuple[list[Component], dict[str, Any]]:
        if hp.neurons is not None and not (len(hp.neurons) == 2 and 0 <= hp.neurons[0] <= hp.neurons[1]):
            raise EditError(f"kn: neurons must be a band (low, high) with 0 <= low <= high, not {hp.neurons!r}")
        watch = Stopwatch()
        unembed = get_module(model.module, model.spec.unembed).weight
        components: list[Component] = []
        found = []
        shares: list[float] = []
        for request in requests:
            prompts = [request.prompt, *request.rephrases]
            old = first_token(model, request.prompt, request.target_true) if request.target_true else \
                int(forward_logits(model, encode(model, [request.prompt]), last=1)[0, -1].argmax())
            new = first_token(model, request.prompt, request.target_new)
            with watch("attribution"):
                activations = last_token_activations(model, prompts, hp.layers)
                scores = neuron_attributions(model, prompts, [old] * len(prompts), hp.layers, hp.steps, activations)
            neurons, share = self.select(scores, hp)
            if not neurons:
                raise EditError(f"kn: no knowledge neurons above threshold {hp.threshold} shared by {share:.0%} of the "
                                f"prompts of {request.prompt!r}; lower threshold or share")
            shares.append(share)
            signs = activations.mean(0).sign().double() if hp.signed else None
            change = (hp.enhance * unembed[new] - hp.erase * unembed[old]).detach().double()
            for layer_index in sorted({li for li, _ in neurons}):  # per layer, the rank-one change · s_Sᵀ
                indicator = torch.zeros(model.spec.mlp_size, dtype=torch.float64, device=change.device)
                chosen = [i for li, i in neurons if li == layer_index]
                indicator[chosen] = signs[layer_index, chosen].to(change.device) if signs is not None else 1.0
                components.append(as_weight_delta(model, hp.layers[layer_index], change[:, None], indicator[None, :]))
            found.append([(hp.layers[li], i) for li, i in neurons])
        return components, {"neurons": found, "share": shares, "timing": watch.report()}

    @staticmethod
    def select(scores: torch.Tensor, hp: KNHParams) -> tuple[list[tuple[int, int]], float]:
        """(layer index, neuron) pairs above ``threshold`` × max for at least ``p`` of the prompts, and that
        ``p``: ``share``, or with ``neurons`` set the grid point chosen as the module docstring says."""
        flat = scores.reshape(scores.shape[0], -1)
        kept = flat > hp.threshold * flat.max(dim=1, keepdim=True).values.clamp(min=0)
        votes = kept.float().mean(0)
        share = hp.share
        if hp.neurons is not None:
            low, high = hp.neurons
            grid = [round(0.05 * k, 2) for k in range(1, 21)]
            counts = {p: int((votes >= p - 1e-9).sum()) for p in grid}

            def miss(p: float) -> tuple[int, int, float]:  # (empty, distance to the band, distance to share)
                n = counts[p]
                return (n == 0, max(low - n, n - high, 0), abs(p - hp.share))

            share = min(grid, key=miss)
        chosen = torch.nonzero(votes >= share - 1e-9).flatten()
        if hp.max_neurons is not None and len(chosen) > hp.max_neurons:
            chosen = chosen[flat.mean(0)[chosen].argsort(descending=True)[: hp.max_neurons]]
        d = scores.shape[2]
        return [(int(j) // d, int(j) % d) for j in chosen], share
