"""Writing through a norm that sits between an MLP's output and the residual stream.

Gemma-2/3 and OLMo-2 normalise each MLP output before adding it to the stream (``spec.mlp_post_norm``):
``y = N(m) = g ⊙ m / rms(m)``. The locate-then-edit solvers change ``W_out``'s output ``m``; these
functions translate between that output and what the stream receives.
"""
from __future__ import annotations

from typing import Any

import torch

from lmedit.errors import EditError
from lmedit.models.spec import get_module


@torch.no_grad()
def post_norm(model: Any, layer: int, m: torch.Tensor) -> torch.Tensor:
    """What the residual stream receives for MLP outputs ``m`` of ``layer``: ``N(m)`` through the
    post-MLP norm (``spec.mlp_post_norm``), ``m`` itself for models without one."""
    if model.spec.mlp_post_norm is None:
        return m
    norm = get_module(model.module, f"{model.spec.block(layer)}.{model.spec.mlp_post_norm}")
    weight = next(norm.parameters(), None)
    return norm(m if weight is None else m.to(weight)).to(m)


@torch.no_grad()
def through_post_norm(model: Any, layer: int, keys: torch.Tensor, residual: torch.Tensor,
                      proximity: float = 1e-4) -> torch.Tensor:
    """The change of ``W_out``'s output that moves the residual stream by ``residual``, for models whose MLP
    output passes a norm first (``spec.mlp_post_norm``: Gemma-2/3, OLMo-2); ``residual`` itself otherwise.

    With ``m = W_out k`` the MLP value for key ``k`` and an RMS norm ``N(m) = g ⊙ m / rms(m)``, the stream
    receives ``y = g ⊙ n`` with ``n = m / rms(m)`` on the sphere ``‖n‖² = d``; the wanted output is
    ``y* = y + r``. Not every ``y*`` is reachable, so ``n*`` solves

        min_n ‖g ⊙ n − y*‖² + ρ ‖n − n₀‖²   subject to ‖n‖² = d

    (``ρ = proximity · mean(g²)`` keeps coordinates the norm all but silences — Gemma-3 has gains from
    0 to 1,600 — where they were). Its solution is ``n*ᵢ = (gᵢ y*ᵢ + ρ n₀ᵢ) / (gᵢ² + ρ + μ)`` with ``μ``
    the root of ``‖n*(μ)‖² = d`` above ``−min(gᵢ² + ρ)`` (found by bisection; ``μ = 0`` when ``r = 0``).
    The norm ignores its input's scale, so ``m* = s n*`` for any ``s > 0``; ``s = ⟨m, n*⟩ / d`` (floored at
    a tenth of ``rms(m)``) makes ``m* − m`` small. Returns ``m* − m`` per row (``keys`` [n, d_mlp],
    ``residual`` [n, d_model]).

    Writing ``r`` into ``W_out`` unchanged (the pre-norm approximation of the reference implementations)
    lands nowhere near ``y*`` on Gemma-3. Raises ``EditError`` for a post-MLP norm that is not an RMS norm.
    """
    if model.spec.mlp_post_norm is None:
        return residual
    out = get_module(model.module, model.spec.path(layer, "mlp_out"))
    m = out(keys.to(next(out.parameters()))).double()
    y = post_norm(model, layer, m)
    gain = post_norm(model, layer, torch.ones_like(m[:1]))[0]  # rms(1) = 1: N(1) = g
    rms = m.pow(2).mean(-1, keepdim=True).sqrt()
    n0 = m / rms
    if not torch.allclose(y, gain * n0, rtol=2e-2, atol=2e-2 * float(y.abs().max())):
        raise EditError(f"the MLP output of layer {layer} passes a norm that is not an RMS norm (g ⊙ m / rms(m)); "
                        "the locate-then-edit solvers cannot write through it")
    d = m.shape[-1]
    wanted = y + residual.double().to(y.device)
    rho = proximity * float(gain.pow(2).mean())
    a = gain.pow(2) + rho  # [d]
    b = gain * wanted + rho * n0  # [n, d]
    low = torch.full_like(rms, -float(a.min()))
    high = b.norm(dim=-1, keepdim=True) / d ** 0.5 + 1.0
    for _ in range(200):  # ‖n*(μ)‖² decreases in μ on (−min a, ∞)
        mid = (low + high) / 2
        too_long = (b / (a + mid)).pow(2).sum(-1, keepdim=True) > d
        low, high = torch.where(too_long, mid, low), torch.where(too_long, high, mid)
    n_star = b / (a + high)
    n_star = n_star * (d ** 0.5 / n_star.norm(dim=-1, keepdim=True))
    s = torch.maximum((m * n_star).sum(-1, keepdim=True) / d, 0.1 * rms)
    return (s * n_star - m).to(residual.dtype).to(residual.device)
