"""Linear-algebra solvers of the locate-then-edit methods, in float64.

Keys are ``d_mlp`` vectors, values ``d_model`` vectors, ``W`` maps keys to values (``[d_model, d_mlp]``).
``C = E[k kᵀ]`` is the keys' second moment over a corpus.

Conditioning guard: ``C`` estimated from a finite corpus can be near-singular in directions the corpus
never excites; every solve uses ``C + ε·(tr C / d)·I`` with ``ε = ridge`` (default 1e-4), i.e. a ridge
of 1e-4 of the mean eigenvalue, which leaves well-excited directions untouched.
"""
from __future__ import annotations

from typing import Any

import torch

from lmedit.patch import WeightDelta


def regularized(C: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """``C + ridge · (tr C / d) · I`` in float64."""
    C = C.to(torch.float64)
    scale = torch.trace(C) / C.shape[0]
    return C + ridge * scale * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)


def rank_one_update(C: torch.Tensor, key: torch.Tensor, delta: torch.Tensor, ridge: float = 1e-4
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME's update ``ΔW = δ (C⁻¹k)ᵀ / (kᵀ C⁻¹ k)`` as factors ``(δ, u)`` with ``ΔW = δ uᵀ``.

    It is the smallest change (in the ``C``-weighted norm) with ``(W + ΔW) k = W k + δ``: it maps the key
    ``k`` to the value ``v* = W k + δ`` exactly. r-ROME: ``k`` is the same averaged key in the numerator
    and the denominator (and the one δ was optimised with).
    """
    k = key.to(torch.float64)
    c_inv_k = torch.linalg.solve(regularized(C, ridge).to(k.device), k)
    u = c_inv_k / (k @ c_inv_k)
    return delta.to(torch.float64), u


def every_key_readout(C: torch.Tensor, K: torch.Tensor, ridge: float = 1e-4, collide: float = 0.0) -> torch.Tensor:
    """The ``u`` of the smallest change ``ΔW`` (``C``-weighted norm) with ``ΔW kⱼ = δ`` for *every* row
    ``kⱼ`` of ``K`` at once: ``u = C⁻¹Kᵀ (K C⁻¹ Kᵀ + μI)⁻¹ 1``, so ``uᵀkⱼ = 1`` for each j (μ = 0) and
    ``ΔW = δ uᵀ`` is still rank one. It is EMMET's update with one constraint per row, all with the
    same value; with a single row it is ROME's ``C⁻¹k / (kᵀC⁻¹k)``. Repeated keys (two contexts that give
    the same key) make the constraints dependent but consistent: a relative μ of at least 1e-10 keeps the
    solve defined without moving the result measurably.
    """
    ones = torch.ones((K.shape[0], 1), dtype=torch.float64, device=K.device)
    _, right = emmet_update(C, K, ones, ridge, max(collide, 1e-10))
    return right.sum(0)


# Batch solvers. Keys are the rows of ``K`` ([n, d_mlp]); the wanted output changes the rows of
# ``R`` ([n, d_model]). Each returns ``(left [d_model, n], right [n, d_mlp])`` with ``ΔW = left @ right``
# (at most rank n: patches store the factors).

def memit_update(C: torch.Tensor, K: torch.Tensor, R: torch.Tensor, weight: float, ridge: float = 1e-4
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's least squares ``ΔW = Rᵀ K (λ C + Kᵀ K)⁻¹`` (keys as rows; λ = ``weight``).

    It minimises ``‖ΔW Kᵀ − Rᵀ‖² + λ tr(ΔW C ΔWᵀ)``: hit the new values while changing the outputs for
    the corpus keys (second moment ``C``) as little as possible.
    """
    K64, R64 = K.to(torch.float64), R.to(torch.float64)
    A = weight * regularized(C, ridge).to(K64.device) + K64.T @ K64
    return R64.T, torch.linalg.solve(A, K64.T).T


def emmet_update(C: torch.Tensor, K: torch.Tensor, R: torch.Tensor, ridge: float = 1e-4, collide: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """EMMET's equality-constrained update ``ΔW = Rᵀ (K C⁻¹ Kᵀ + μI)⁻¹ K C⁻¹`` (keys as rows).

    The smallest change in the ``C``-weighted norm with ``ΔW kᵢ = rᵢ`` for every request exactly (μ = 0);
    ``collide`` = μ, relative to the mean diagonal of ``K C⁻¹ Kᵀ``, relaxes the constraints when
    requests share keys. With one request it is ROME's rank-one update.
    """
    K64, R64 = K.to(torch.float64), R.to(torch.float64)
    c_inv_kt = torch.linalg.solve(regularized(C, ridge).to(K64.device), K64.T)  # [d_mlp, n]
    gram = K64 @ c_inv_kt
    gram = gram + collide * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return R64.T, torch.linalg.solve(gram, c_inv_kt.T)


def nullspace_projector(C: torch.Tensor, threshold: float, energy: float | None = None) -> tuple[torch.Tensor, int]:
    """AlphaEdit's ``P = Û Ûᵀ`` over the eigenvectors of ``C`` with eigenvalue below ``threshold``.

    For every corpus key ``k₀``, ``P k₀ ≈ 0``: an update of the form ``ΔW = X P`` leaves ``W k₀`` unchanged.
    The published absolute threshold (2e-2) depends on the keys' scale; ``energy`` instead takes the
    smallest eigen-directions that together hold at most that fraction of ``tr C`` (the corpus keys'
    mean squared norm), so ``E‖P k₀‖² ≤ energy · E‖k₀‖²`` on any model.
    Returns ``(P, dimension of the null space)``.
    """
    values, vectors = torch.linalg.eigh(C.to(torch.float64))  # ascending
    if energy is None:
        small = vectors[:, values < threshold]
    else:
        positive = values.clamp(min=0)
        small = vectors[:, torch.cumsum(positive, 0) / positive.sum() <= energy]
    return small @ small.T, int(small.shape[1])


def alphaedit_update(P: torch.Tensor, K: torch.Tensor, R: torch.Tensor, preserved: torch.Tensor | None = None,
                     l2: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's null-space update ``ΔW = Rᵀ K P (K_pᵀK_p P + KᵀK P + l2·I)⁻¹`` (keys as rows).

    ``preserved`` is ``K_pᵀ K_p`` ([d_mlp, d_mlp]) of earlier edits' keys (sequential editing), which the
    update also leaves (nearly) unchanged. Because ``ΔWᵀ = (…)⁻¹ P Kᵀ R`` and ``P C ≈ 0``, the outputs
    for corpus keys are left unchanged. Solved as ``ΔWᵀ = (P (K_pᵀK_p + KᵀK) + l2·I)⁻¹ P Kᵀ R``.
    """
    K64, R64, P64 = K.to(torch.float64), R.to(torch.float64), P.to(torch.float64).to(K.device)
    gram = K64.T @ K64 if preserved is None else preserved.to(torch.float64).to(K.device) + K64.T @ K64
    A = P64 @ gram + l2 * torch.eye(P64.shape[0], dtype=torch.float64, device=P64.device)
    return R64.T, torch.linalg.solve(A, P64 @ K64.T).T


def as_weight_delta(model: Any, layer: int, left: torch.Tensor, right: torch.Tensor) -> WeightDelta:
    """The patch component for ``ΔW = left @ right`` on ``W_out`` of ``layer``, in the parameter's own
    layout (GPT-2's ``Conv1D`` stores ``Wᵀ``), factors kept in float32."""
    param = f"{model.spec.path(layer, 'mlp_out')}.weight"
    if model.spec.weight_layout == "in_out":
        left, right = right.T, left.T
    return WeightDelta(param, left=left.float().cpu().contiguous(), right=right.float().cpu().contiguous())
