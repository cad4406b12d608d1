"""ROME: Rank-One Model Editing (Meng et al. 2022), with the r-ROME key fix (Gupta et al. 2024).

One MLP output projection ``W`` (``[d_model, d_mlp]``) is treated as a linear key→value memory. For a
request with subject ``s``:

1. ``k*`` = mean key at the subject's last token over context-prefixed prompts (``keyvalue.compute_keys``);
2. ``δ`` = the change of that layer's value which makes the model produce the target (``keyvalue.optimize_values``);
3. ``ΔW = δ (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*)`` (``solvers.rank_one_update``), ``C = E[k kᵀ]`` over a corpus
   (``lmedit.stats``), so ``(W + ΔW) k* = W k* + δ = v*``.

**Update-aware values** (``update_aware``, on by default). The published step 2 adds the same ``δ`` to
every prefixed prompt's value, but the written update gives the prompt with key ``k_j`` the change
``δ · uᵀk_j`` (``u = C⁻¹k*/(k*ᵀC⁻¹k*)``), which is ``δ`` only at the average key ``k*``: a prompt whose
key lies far from the average sees much less (or more) of the edit than was optimised. lmedit
computes ``u`` first (it needs only ``k*`` and ``C``) and optimises ``δ`` through it, so the
probabilities reached are the edited model's. Same cost; first 50 CounterFact cases on SmolLM2
(``runs/smollm2-135m-counterfact-rome{-published,}-single-50``): efficacy 0.94 → 0.98, paraphrase
0.80 → 0.84, generation reliability 0.86 → 0.90, neighbourhood 0.70 either way.

**Every context's key, and the prompt itself weighted** (``keys="each"``, ``prompt_share=0.5``, the
defaults since session 12). ROME's single equation ``(W + ΔW)k* = v*`` holds at the *average* key; the
prompt without a prefix (the one users type, and the one reliability is scored on) has the subject right
after the document start, and on SmolLM2 its key lies far from that average (``uᵀk`` 0.2–0.8 where the
prefixed prompts get ≈ 1) while the loss gives it 1/21 of the weight; the KL prompt ``"{subject} is a"``,
shaped like it, then holds it back. Traced on the 17 of the first 500 CounterFact cases where ROME's
efficacy failed: every prefixed prompt reached p(target) ≈ 0.95, the bare prompt 0.00–0.14. lmedit
writes ``ΔW kⱼ = δ`` at every context's key (the smallest such change is still rank one:
``u = C⁻¹Kᵀ(KC⁻¹Kᵀ)⁻¹1``, ``solvers.every_key_readout``) and gives the bare prompt half of the NLL (the
prefixed ones share the other half). First 50 CounterFact cases on SmolLM2
(``runs/smollm2-135m-counterfact-rome{-meankey,}-single-50``): Rel.(tf) 0.93 → 1.00, Rel.(gen) 0.90 →
0.96, efficacy 0.98 → 1.00, paraphrase 0.84 → 0.88, neighbourhood 0.70 → 0.70, same v* steps; first 20
ZsRE cases (``…-zsre-rome{-meankey,}-single-20``): Rel.(tf) 0.71 → 0.90, Gen.(tf) 0.54 → 0.64, Loc.(tf)
0.98 → 0.96.
``keys="mean", prompt_share=None`` is the previous default; with ``update_aware=False`` too, the published
method.

**A tighter clamp behind a post-MLP norm** (``default_clamp``, since session 13). Gemma-2/3 and OLMo-2
normalise each MLP output before the residual stream (``spec.mlp_post_norm``), so what the stream receives
from ``v̄ + δ`` saturates in ``‖δ‖``: once ``δ`` outweighs ``v̄`` the edited prompt gains little, while every
other prompt's share ``uᵀk·δ`` keeps growing. With the published clamp (``‖δ‖ ≤ 4‖v̄‖``) Gemma-3-270M lost
6 of its first 50 CounterFact neighbourhood prompts, each receiving only 8–17 % of the subject's change
(traced on cases 5 and 16: 1.3 of 13.3 and 2.2 of 17.1 at the neighbour's subject tokens). With
``‖δ‖ ≤ ‖v̄‖`` (``runs/gemma3-270m-counterfact-rome{-clamp4,}-single-50``): neighbourhood 0.70 → 0.80
(unedited 0.82), Rel.(tf) 0.97 → 1.00, Rel.(gen) 0.94 → 0.98, Loc.(tf) 0.94 → 0.98, efficacy 1.00 and
paraphrase 0.98 either way, and v* stops sooner (13.5 vs 34.5 s/edit, one thread). Models without such a
norm keep the published 4.

Several requests are edited one after another, each on top of the previous ones. The patch holds one
rank-one ``WeightDelta`` per request. Defaults: the layer at the depth fraction of Llama-7B's layer 5
of 32; v* optimisation as published for GPT-2 XL (Adam lr 0.5, KL 0.0625, weight decay 0.5, clamp 4, or 1
behind a post-MLP norm) except up to 40 steps instead of 20 (below); statistics over up to 100k corpus tokens.

**Up to 40 v* steps** (since session 36; ``steps=20`` is the published count). v* stops once the target's mean
probability passes ``stop_prob`` (0.95), so the cap only matters for the facts that are slow to write — ZsRE's
multi-token answers, mostly: at 20 steps 120 of Gemma-3's first 500 ZsRE edits stopped at the cap. On SmolLM2's first
500 ZsRE cases (``runs/smollm2-135m-zsre-rome{,-steps40}-single-500``) 40 steps raise exact-match reliability
0.76 → 0.93 (teacher-forced 0.94 → 0.99; generalisation 0.69 → 0.70, locality 0.99 either way; target probability
0.73 → 0.90) for 19.2 → 31.9 steps per edit; on CounterFact, where v* mostly stops early, the first 10 edits take
15.2 → 19.4 steps and 12.3 → 14.0 s (``benchmarks/locate_speed.py --parts rome,vstep --n 10``, the machine's other
runs paused).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lmedit.errors import EditError
from lmedit.methods.base import Method, Stopwatch
from lmedit.methods.keyvalue import LocateHParams, compute_keys, context_templates, optimize_values
from lmedit.methods.solvers import as_weight_delta, every_key_readout, rank_one_update
from lmedit.patch import Component
from lmedit.requests import EditRequest
from lmedit.stats import second_moment


@dataclass
class ROMEHParams(LocateHParams):
    """Hyper-parameters of ROME (``None`` entries are derived from the model; the shared v*, context and
    statistics settings are ``LocateHParams``'s)."""

    layer: int | None = None
    update_aware: bool = True  # optimise δ through the rank-one map (module docstring); False: as published
    keys: str = "each"  # "each": ΔW k_j = δ at every context's key (module docstring); "mean": ROME's k*
    collide: float = 0.0  # with keys="each": relaxes the per-context equalities (EMMET's μ)
    prompt_share: float | None = 0.5  # the unprefixed prompt's weight in the v* loss; None: uniform (published)
    clamp_norm_factor: float | None = None  # ‖δ‖ ≤ this · ‖v̄‖; default 4 (published), 1 behind a post-MLP norm
    steps: int = 40  # v* steps at most (published: 20; see the module docstring)

    def _defaults(self, model: Any) -> dict[str, Any]:
        return {"layer": model.spec.layer_at(5 / 31), "clamp_norm_factor": default_clamp(model)}


def default_clamp(model: Any) -> float:
    """ROME's ``clamp_norm_factor``: the published 4 (``‖δ‖ ≤ 4‖v̄‖``), or 1 where a norm sits between the MLP
    and the residual stream (``spec.mlp_post_norm``: Gemma-2/3, OLMo-2). See the module docstring."""
    return 1.0 if model.spec.mlp_post_norm is not None else 4.0


class ROME(Method):
    name = "rome"
    HParams = ROMEHParams

    def touched(self, model: Any, hp: ROMEHParams, requests: Sequence[EditRequest]) -> list[str]:
        return [f"{model.spec.path(hp.layer, 'mlp_out')}.weight"]

    def compute(self, model: Any, hp: ROMEHParams, requests: Sequence[EditRequest],
                originals: dict[str, torch.Tensor]) -> tuple[list[Component], dict[str, Any]]:
        if hp.keys not in ("mean", "each"):
            raise EditError(f"ROME keys must be 'mean' or 'each', not {hp.keys!r}")
        watch = Stopwatch()
        with watch("statistics"):
            C = second_moment(model, hp.layer, hp.corpus, hp.stats_tokens).mean
        with watch("templates"):
            templates = context_templates(model, [tuple(x) for x in hp.context_lengths])
        components: list[Component] = []
        infos = []
        for request in requests:  # one after another: each sees the previous edits
            with watch("keys"):
                keys = compute_keys(model, hp.layer, [request], templates, average=False)  # one per context
                if hp.keys == "each":
                    u = every_key_readout(C, keys, hp.ridge, hp.collide)  # uᵀk_j = 1 for every context j
                else:
                    _, u = rank_one_update(C, keys.mean(0), keys.new_zeros(1), hp.ridge)  # C⁻¹k*/(k*ᵀC⁻¹k*)
            with watch("values"):
                readout = u.float()[None] if hp.update_aware else None
                delta, _, info = optimize_values(model, hp.layer, [request], templates, hp.value_config(),
                                                 readout=readout)
            with watch("solve"):
                change = as_weight_delta(model, hp.layer, delta[0, 0].double()[:, None], u[None, :])
                change.apply(model)
                change.commit()  # the transaction restores the weight; the patch re-applies it
            components.append(change)
            infos.append(info)
        return components, {"v_steps": [i["steps"][0] for i in infos], "v_prob": [i["prob"][0] for i in infos],
                            "timing": watch.report()}
