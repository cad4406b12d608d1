"""The multi-layer locate-then-edit family: MEMIT, PMET, EMMET and AlphaEdit.

They share one algorithm (Meng et al. 2023) and differ in where the target is optimised, how the
residual is shared between layers, and how each layer's update is solved:

1. ``z*``: optimise ``δ`` (``keyvalue.optimize_values``) at the **last** edit layer ``L`` so the model
   produces every target after the context-prefixed prompts; ``z* = z₀ + δ`` with ``z₀`` the readout at
   the subject's last token of the plain prompt.
2. For each edit layer ``l`` in order: keys ``K`` at ``l`` (mean over the templates), the current readout
   ``z`` at ``L``, residual ``R = (z* − z) / share(l)``, then ``ΔW_l = solve(C_l, K, R)`` is applied before
   the next layer, so later layers see the earlier updates.

================  ====================================  =====================  ==========================================
method            δ optimised at (readout)              share(l)               solve
================  ====================================  =====================  ==========================================
MEMIT             block output (residual stream)¹       layers remaining       ``Rᵀ K (λC + KᵀK)⁻¹``
PMET              attention and MLP outputs jointly;    √(layers remaining)    as MEMIT
                  the MLP part is written
EMMET             block output¹                         layers remaining       ``Rᵀ (K C⁻¹ Kᵀ + μI)⁻¹ K C⁻¹`` (exact)
AlphaEdit         block output¹                         layers remaining       ``Rᵀ K P (K_pᵀK_p P + KᵀK P + αI)⁻¹``
================  ====================================  =====================  ==========================================

¹ the MLP output before its norm on models with a post-MLP norm (below).
(``solvers`` has the derivations.) Keys are rows; ``C`` the keys' second moment over a corpus
(``lmedit.stats``).

Models whose MLP output passes a norm ``N`` before joining the residual stream (Gemma-2/3's
post-feed-forward RMS norm, gains from 0 to 1,600 on Gemma-3-270M) need two changes, both exact where
the reference implementations' pre-norm approximation is not: ``z*`` is optimised at the last layer's
MLP output *before* its norm (as PMET does; a block-output ``z*`` is mostly unreachable through the norm
— 37 % of it was lost even at the averaged key), so the last layer writes its residual directly; an
earlier layer receives the stream change ``(N(z*) − N(z)) / share`` mapped back through its own norm
(``post_norm.through_post_norm``). First 50 CounterFact cases on Gemma-3: with the approximation MEMIT
edited nothing (reliability 0.00) and damaged the neighbourhood; with the mapping alone, reliability
0.56; with both, see the README's table.

Defaults: layers at the depth fractions of Llama-7B's 4–8 of 32; the published v* settings (MEMIT and
EMMET: GPT-J's lr 0.5, 25 steps, clamp 0.75; PMET: Llama-2's lr 0.5, 20 steps, clamp 1.0; AlphaEdit:
GPT-J's and GPT-2 XL's lr 0.5, 25 steps, clamp 0.75, null-space threshold 2e-2, α = 10 — its Llama-3
lr 0.1 leaves v* unconverged on the small models: on SmolLM2 the target's probability after 25 steps
was 0.004–0.59 on the first four CounterFact cases, 0.95–0.97 with lr 0.5 in 9–21 steps); λ = 15,000
with ``C`` the mean over the corpus, scaled to the model's key dimension (``MOM2_PER_KEY_DIM``); 5
model-written context prefixes of 10 tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from lmedit.errors import EditError
from lmedit.methods.base import Method, Stopwatch
from lmedit.methods.keyvalue import (LocateHParams, ValueConfig, compute_keys, context_templates, optimize_values,
                                     read_at_subject)
from lmedit.methods.post_norm import post_norm, through_post_norm
from lmedit.methods.solvers import alphaedit_update, as_weight_delta, emmet_update, memit_update, nullspace_projector
from lmedit.patch import Component, EditedKeys, edited_keys
from lmedit.requests import EditRequest
from lmedit.stats import second_moments


MOM2_PER_KEY_DIM = 15_000 / 16_384
"""λ per key dimension: GPT-J's published λ = 15,000 over its d_mlp = 16,384.

One edit's layer update realises the fraction ``q / (λ + q)`` of its residual, ``q = k*ᵀ C⁻¹ k*``, and
``q`` grows with the key dimension (``E[q] = d_mlp`` for a corpus key). A fixed λ = 15,000 is a
different trade-off on every model: on SmolLM2 (d_mlp 1,536, subject keys' ``q`` 2,000–8,000 at
layers 4–7) it realised ~30 % per layer and MEMIT wrote 7 of 8 CounterFact edits (log-odds new vs old
+1.5 to +6); λ = 1,406 (this rule) wrote 8 of 8 (+6.9 to +18.8)."""


@dataclass
class MEMITHParams(LocateHParams):
    """Hyper-parameters of the MEMIT family (``None`` entries are derived from the model; the shared v*,
    context and statistics settings are ``LocateHParams``'s, here with GPT-J's published values).

    Attributes:
        layers: the edit layers (consecutive; the last one is where ``z*`` is optimised).
        mom2_weight: λ, the weight of the corpus keys against the new ones (default: GPT-J's 15,000 per
            its 16,384 key dimensions, times the model's ``d_mlp``; see ``MOM2_PER_KEY_DIM``).
        value_group: requests whose v* are optimised together in one batch (speed and memory only).
        value_cache: keep each request's optimised values on disk (``value_cache.ValueStore``), so a killed
            mass edit resumes without redoing them.
        keys: ``"mean"`` (published): one row per request, its key averaged over the contexts and its
            residual read on the bare prompt; ``"each"``: one row per request and context (its own key and
            residual ``z₀ⱼ + δ − zⱼ``), rows weighted 1/(contexts) so the corpus term keeps its weight —
            ROME's fix (``rome.py``) carried over. On the first 50 CounterFact cases on SmolLM2 it changes
            nothing but Gen.(tf) (0.26 → 0.29; Rel. 0.95, Eff. 0.98, Para. 0.84, Neigh. 0.70 either way): MEMIT's
            3 misses there have converged v* (p ≈ 0.955) and lose the fact in the λ-weighted write instead.
    """

    layers: tuple[int, ...] | None = None
    steps: int = 25
    clamp_norm_factor: float = 0.75
    context_lengths: tuple = ((10, 5),)
    mom2_weight: float | None = None
    value_group: int = 8
    value_cache: bool = True
    keys: str = "mean"  # "each": one least-squares row per context, weighted 1/contexts (see above)

    def _defaults(self, model: Any) -> dict[str, Any]:
        first, last = model.spec.layer_at(4 / 31), model.spec.layer_at(8 / 31)
        return {"layers": tuple(range(first, max(first, last) + 1)),
                "mom2_weight": round(MOM2_PER_KEY_DIM * model.spec.mlp_size, 1)}

    def value_config(self, group: int | None = None, cache: bool | None = None) -> ValueConfig:
        return super().value_config(self.value_group if group is None else group,
                                    self.value_cache if cache is None else cache)


class MEMIT(Method):
    """MEMIT: least-squares updates spread over several layers (see the module docstring)."""

    name = "memit"
    HParams = MEMITHParams
    sites: ClassVar[tuple[str, ...]] = ("block",)  # where δ is optimised at the last layer
    written_site: ClassVar[int] = 0  # which of them the weight updates must realise
    root_share: ClassVar[bool] = False  # PMET divides the residual by √(layers remaining)

    def touched(self, model: Any, hp: MEMITHParams, requests: Sequence[EditRequest]) -> list[str]:
        return [f"{model.spec.path(layer, 'mlp_out')}.weight" for layer in self._layers(model, hp)]

    @staticmethod
    def _layers(model: Any, hp: MEMITHParams) -> list[int]:
        return sorted({model.spec._layer(layer) for layer in hp.layers})

    def compute(self, model: Any, hp: MEMITHParams, requests: Sequence[EditRequest],
                originals: dict[str, torch.Tensor]) -> tuple[list[Component], dict[str, Any]]:
        if hp.keys not in ("mean", "each"):
            raise EditError(f"{self.name} keys must be 'mean' or 'each', not {hp.keys!r}")
        layers = self._layers(model, hp)
        last = layers[-1]
        watch = Stopwatch()
        with watch("statistics"):
            moments = second_moments(model, layers, hp.corpus, hp.stats_tokens)
        with watch("templates"):
            templates = context_templates(model, [tuple(x) for x in hp.context_lengths])
        sites = self.optimised_sites(model)
        readout = model.spec.path(last, sites[self.written_site])
        each = hp.keys == "each"
        rows, per = (templates, len(templates)) if each else (["{}"], 1)  # where keys and residuals are read

        def readouts() -> torch.Tensor:
            return read_at_subject(model, readout, "output", requests, rows, average=False)

        with watch("values"):
            z0 = readouts()
            delta, _, info = optimize_values(model, last, requests, templates, hp.value_config(), sites)
        target = z0 + delta[self.written_site].repeat_interleave(per, dim=0)
        components: list[Component] = []
        residuals = []
        for i, layer in enumerate(layers):
            with watch("keys"):
                keys = compute_keys(model, layer, requests, templates, average=not each)
                z = readouts()
            remaining = len(layers) - i
            residuals.append(round(float((target - z).norm(dim=-1).mean()), 4))
            share = remaining ** 0.5 if self.root_share else remaining
            if sites[self.written_site] == "block" or layer == last:  # z* is what this update changes
                residual = (target - z) / share
            else:  # z* is a last-layer MLP output before its norm: the stream gets N(z*) − N(z)
                change = post_norm(model, last, target) - post_norm(model, last, z)
                residual = through_post_norm(model, layer, keys, change / share)
            with watch("solve"):  # rows weighted 1/per: the corpus term keeps its weight against a request
                left, right = self.solve(model, hp, layer, moments[layer].mean, keys / per ** 0.5, residual / per ** 0.5)
                change = as_weight_delta(model, layer, left, right)
                change.apply(model)
                change.commit()  # the transaction restores the weight; the patch re-applies it
            components.append(change)
        with watch("keys"):
            components += self.records(model, hp, layers, requests, templates)
            z = readouts()
        residuals.append(round(float((target - z).norm(dim=-1).mean()), 4))
        return components, {"v_steps": info["steps"], "v_prob": info["prob"], "residual_norms": residuals,
                            "timing": watch.report()}

    def optimised_sites(self, model: Any) -> tuple[str, ...]:
        """Where δ is optimised at the last layer: ``sites``, except that on models with a post-MLP norm
        the block output becomes the MLP output before the norm (see the module docstring)."""
        if model.spec.mlp_post_norm is not None and self.sites == ("block",):
            return ("mlp_out",)
        return self.sites

    def solve(self, model: Any, hp: MEMITHParams, layer: int, C: torch.Tensor, K: torch.Tensor,
              R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` factors of ``ΔW`` for keys ``K`` [n, d_mlp] and residuals ``R`` [n, d_model]."""
        return memit_update(C, K, R, hp.mom2_weight, hp.ridge)

    def records(self, model: Any, hp: MEMITHParams, layers: list[int], requests: Sequence[EditRequest],
                templates: list[str]) -> list[Component]:
        """Extra, non-weight components of the patch (AlphaEdit records the keys it wrote)."""
        return []


@dataclass
class PMETHParams(MEMITHParams):
    steps: int = 20
    clamp_norm_factor: float = 1.0


class PMET(MEMIT):
    """PMET: δ for the attention and the MLP outputs optimised jointly; only the MLP part is written,
    so each update carries just the MLP's share of the change (Li et al. 2024)."""

    name = "pmet"
    HParams = PMETHParams
    sites = ("attn_out", "mlp_out")
    written_site = 1
    root_share = True


@dataclass
class EMMETHParams(MEMITHParams):
    """EMMET's settings: MEMIT's, plus the relaxation μ of its equalities (``mom2_weight`` is unused).

    ``collide``: μ relative to the mean diagonal of ``K C⁻¹ Kᵀ`` (the published ``emmet_lambda`` is an
    absolute 0.1; relative, the guard means the same on every model). By the push-through identity
    ``Rᵀ (K C⁻¹ Kᵀ + μI)⁻¹ K C⁻¹ = Rᵀ K (μC + KᵀK)⁻¹`` EMMET at μ is MEMIT at λ = μ, so μ is the knob
    between exact equalities and MEMIT's trade-off. Exactness costs where the batch nears the key
    dimension: 1,000 CounterFact edits in one batch on SmolLM2 (d_mlp 1,536; μ ≈ 52 against MEMIT's
    λ = 1,406; the smallest eigenvalues of ``K C⁻¹ Kᵀ`` fall to ~10 against a diagonal of ~5,000) wrote
    Rel.(tf) 0.15 against MEMIT's 0.64 (efficacy 0.82 vs 0.92, target perplexity 281 vs 7): the
    interpolant through the context-averaged keys misses the bare prompt's key. Eight layers instead of
    four do not help (each layer meets all 1,000 equalities): ``runs/smollm2-135m-counterfact-emmet-*``.
    On GPT-J (d_mlp 16,384) the same batch is 6 % of the key dimension, here 65 %.
    """

    collide: float = 1e-2  # μ, relative to the mean diagonal of K C⁻¹ Kᵀ


class EMMET(MEMIT):
    """EMMET: every layer's update maps the new keys to their residuals exactly (Gupta et al. 2024)."""

    name = "emmet"
    HParams = EMMETHParams

    def solve(self, model: Any, hp: EMMETHParams, layer: int, C: torch.Tensor, K: torch.Tensor,  # type: ignore[override]
              R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return emmet_update(C, K, R, hp.ridge, hp.collide)


@dataclass
class AlphaEditHParams(MEMITHParams):
    nullspace_threshold: float = 2e-2
    nullspace_energy: float | None = None  # set: the null space holds this fraction of the corpus keys' energy
    l2: float = 10.0


class AlphaEdit(MEMIT):
    """AlphaEdit: updates projected onto the null space of the corpus keys and, in sequential use, kept
    off the keys of earlier edits (Fang et al. 2025). The patch records its keys (``EditedKeys``): while
    it is applied, later AlphaEdit edits preserve them; reverting it releases them.

    The null space is the eigenvectors of ``C`` below ``nullspace_threshold`` (published: 2e-2) or, with
    ``nullspace_energy``, the smallest ones holding that share of the corpus keys' energy. On SmolLM2 the
    published threshold keeps 1,100–1,230 of 1,536 directions, which hold 25–36 % of the energy, so it is
    not a null space in the strict sense; yet a stricter one does not buy locality. One batch of 100 ZsRE
    edits, Rel.(tf) / Loc.(tf): published 0.67 / 0.88; energy 5 % 0.44 / 0.88; 1 % 0.25 / 0.90; 1 % with
    ``l2`` = 1: 0.41 / 0.68. What keeps unrelated outputs is ``l2`` (the update's norm), not ``P``: an update
    written through directions the corpus seldom uses must be large there, and other prompts' keys
    still have components along them. Nor is it the earlier edits' weight in the solve: ten times ``K_pᵀK_p``
    scored 600 sequential ZsRE edits (batches of 100) as the published weight does (Rel.(tf) 0.62 / Loc.(tf)
    0.73 against 0.62 / 0.70, efficacy 0.89 both): earlier edits hold at their subject keys and are lost
    through their prompts' other positions (``benchmarks/edited_key_drift.py``)."""

    name = "alphaedit"
    HParams = AlphaEditHParams

    def solve(self, model: Any, hp: AlphaEditHParams, layer: int, C: torch.Tensor, K: torch.Tensor,  # type: ignore[override]
              R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("nullspace", layer, hp.nullspace_threshold, hp.nullspace_energy, hp.stats_tokens, str(hp.corpus))
        if key not in model.cache:
            model.cache[key] = nullspace_projector(C, hp.nullspace_threshold, hp.nullspace_energy)
        P, dim = model.cache[key]
        if dim == 0:
            if hp.nullspace_energy is not None:
                raise EditError(f"alphaedit: no direction of layer {layer}'s keys holds less than nullspace_energy="
                                f"{hp.nullspace_energy:g} of their energy; raise it")
            smallest = float(torch.linalg.eigvalsh(C.double())[0])
            raise EditError(f"alphaedit: the keys of layer {layer} have no null space below nullspace_threshold="
                            f"{hp.nullspace_threshold:g} (smallest eigenvalue of C: {smallest:.3g}); raise the threshold "
                            "or set nullspace_energy")
        earlier = edited_keys(model, f"{model.spec.path(layer, 'mlp_out')}.weight")
        preserved = None if earlier is None else earlier.double().T @ earlier.double()
        return alphaedit_update(P, K, R, preserved, hp.l2)

    def records(self, model: Any, hp: MEMITHParams, layers: list[int], requests: Sequence[EditRequest],
                templates: list[str]) -> list[Component]:
        # the keys as the edited model sees them (as the reference implementation accumulates them)
        return [EditedKeys(f"{model.spec.path(layer, 'mlp_out')}.weight",
                           compute_keys(model, layer, requests, templates).float().cpu()) for layer in layers]
