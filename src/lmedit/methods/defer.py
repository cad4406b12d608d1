"""DEFER (the deferral baseline of Hartvigsen et al. 2023, GRACE paper): a learned gate and a side adaptor.

Beside one layer's ``W_out`` sit a **gate** ``g(a) = σ(w·a + b)`` and an **adaptor** ``u(a) = V a + c``
(``V`` starts as a copy of ``W_out``, so an untrained adaptor changes nothing). For the key ``a_t`` at
each position, the layer's output becomes ``u(a_t)`` where ``g(a_t) ≥ threshold`` (0.5) and stays
``W_out a_t`` elsewhere. Training uses the soft mixture ``g·u(a) + (1 − g)·W_out a`` at every position
and minimises, with Adam (adaptor lr 5e-4, 50 steps; the gate's lr below),

    L = NLL(y | x_e) + BCE(g, 1) on x_e's positions from its last prompt token on
                     + BCE(g, 0) on every position of unrelated sentences x_irr.

Only the gate and adaptor on ``W_out``'s output train, so the keys ``a`` (``W_out``'s inputs) stay fixed:
the unrelated sentences enter the loss only through ``g(a)`` and are run once, up to ``W_out``; only the
edit rows, which need the target's NLL, run every step (from the edited layer up, the blocks below replayed).

**The gate's step does not depend on the scale of the keys.** Adam moves each coordinate of ``w`` by about
its lr per step, so the logit ``w·a`` moves by about ``lr · ‖a‖₁``: a fixed gate lr is a slow gate on a model
whose keys are small. Gemma-3-270M's keys at the DEFER layer are ~8× smaller than SmolLM2-135M's (mean ‖a‖₁
57 against 448 on ZsRE edits), and with lr 1e-3 its gate stays near 0.5 and the hard gate keeps the adaptor
shut (Rel. 0.40 at T = 1). So the gate's lr is ``gate_step / mean ‖a‖₁`` over the keys it is trained on in
this edit (its logit then moves by about ``gate_step`` per step on any model); ``gate_step = 0.45`` gives
SmolLM2 ≈ 1e-3, the lr it was tuned with. ``gate_lr`` set explicitly overrides this.

The reference toolkit's Llama-2 setting (lr 7e-5, 100 steps, for an adaptor initialised at random)
leaves a SmolLM2 ZsRE edit unlearned (target NLL 0.78 after 100 steps); from the ``W_out`` copy,
lr 5e-4 reaches NLL 0.01–0.13 in 50 steps. The gate and adaptor are shared by all edits and trained further by each new one (without replay),
which is the baseline's known weakness in lifelong use: later edits overwrite earlier ones. A patch
holds the whole gate/adaptor state before and after the edit, so it reverts exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from lmedit.adaptors import Adaptor, adaptors, get_or_attach
from lmedit.errors import EditError, PatchError
from lmedit.hooks import ReplayBelow, read_module
from lmedit.methods.base import HParams, Method, Stopwatch
from lmedit.methods.unrelated import sample_per_request, unrelated_sentences
from lmedit.models.spec import get_module, is_conv1d
from lmedit.patch import COMPONENTS, Component
from lmedit.requests import EditRequest
from lmedit.scoring import encode, target_logprobs

STATE = ("gate_w", "gate_b", "value_w", "value_b")


class DeferralAdaptor(Adaptor):
    """The gate and adaptor on one ``W_out`` module (see the module docstring); float32 tensors."""

    transient = ("_handle", "_on_device", "last_gate")

    def __init__(self, path: str, state: dict[str, torch.Tensor], threshold: float, version: int = 0) -> None:
        super().__init__(path)
        self.state = state
        self.threshold = threshold
        self.version = version
        self._on_device: dict[str, torch.Tensor] | None = None
        self.last_gate: torch.Tensor | None = None  # [B, T] gate values of the last forward pass

    def is_empty(self) -> bool:
        return False

    def as_component(self) -> "DeferralEdit":
        return DeferralEdit(self.path, None, _clone(self.state), self.threshold, -1, self.version)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        if self._on_device is None or next(iter(self._on_device.values())).device != x.device:
            self._on_device = {k: v.to(x.device) for k, v in self.state.items()}
        s = self._on_device
        a = x.float()
        gate = torch.sigmoid(a @ s["gate_w"] + s["gate_b"])
        self.last_gate = gate.detach()
        defer = gate >= self.threshold
        if not bool(defer.any()):
            return None
        values = (a[defer] @ s["value_w"].T + s["value_b"]).to(out.dtype)
        new = out.clone()
        new[defer] = values
        return new


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float().cpu() for k, v in state.items()}


@dataclass(eq=False)
class DeferralEdit(Component):
    """Set the gate/adaptor state on one module from ``before`` (``None``: no adaptor) to ``after``."""

    kind: ClassVar[str] = "deferral_edit"
    memory: ClassVar[bool] = True
    path: str
    before: dict[str, torch.Tensor] | None
    after: dict[str, torch.Tensor]
    threshold: float
    version_before: int
    version_after: int

    def _current(self, model: Any) -> DeferralAdaptor | None:
        current = adaptors(model).get(self.path)
        if current is not None and not isinstance(current, DeferralAdaptor):
            raise PatchError(f"{self.path} carries a {type(current).__name__}, not a DEFER adaptor")
        return current

    def apply(self, model: Any) -> None:
        current = self._current(model)
        if self.before is None and current is not None:
            raise PatchError(f"{self.path} already has a DEFER adaptor; this patch creates one (apply it first)")
        if self.before is not None and (current is None or current.version != self.version_before):
            raise PatchError(f"this DEFER patch expects adaptor version {self.version_before} on {self.path}; "
                             "apply (or revert) DEFER patches in order")
        adaptor = get_or_attach(model, self.path, DeferralAdaptor, _clone(self.after), self.threshold, self.version_after)
        adaptor.state, adaptor.version, adaptor.threshold = _clone(self.after), self.version_after, self.threshold
        adaptor._on_device = None

    def revert(self, model: Any) -> None:
        current = self._current(model)
        if current is None or current.version != self.version_after:
            raise PatchError(f"this DEFER patch is not the last one applied on {self.path}")
        if self.before is None:
            adaptors(model).pop(self.path).detach()
            return
        current.state, current.version, current._on_device = _clone(self.before), self.version_before, None

    def commit(self) -> None:
        self.before = None if self.before is None else {}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"after.{k}": v for k, v in self.after.items()}
        if self.before:
            out.update({f"before.{k}": v for k, v in self.before.items()})
        return out

    def manifest(self) -> dict[str, Any]:
        return {"path": self.path, "threshold": self.threshold, "created": self.before is None,
                "version_before": self.version_before, "version_after": self.version_after}

    @classmethod
    def restore(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "DeferralEdit":
        before = None if manifest["created"] else {k: tensors[f"before.{k}"] for k in STATE if f"before.{k}" in tensors}
        return cls(manifest["path"], before, {k: tensors[f"after.{k}"] for k in STATE}, manifest["threshold"],
                   manifest["version_before"], manifest["version_after"])


COMPONENTS[DeferralEdit.kind] = DeferralEdit


@dataclass
class DEFERHParams(HParams):
    """Hyper-parameters of DEFER (see the module docstring).

    Attributes:
        layer: the layer whose ``W_out`` gets the gate and adaptor (default: depth fraction 27/31).
        lr: Adam learning rate of the adaptor.  steps: optimisation steps.
        gate_step: the gate's learning rate in logit units: its lr is ``gate_step / mean ‖a‖₁`` over the keys it
            is trained on (see the module docstring).  gate_lr: a fixed lr for the gate instead.
        threshold: the gate value from which the adaptor answers.
        n_irrelevant: unrelated inputs per edit (``irrelevant`` if given, else ``unrelated.unrelated_sentences(corpus)``:
            sentences of a text corpus, or an edit dataset's locality prompts, e.g. ``corpus="zsre-train"``).
    """

    layer: int | None = None
    lr: float = 5e-4
    gate_step: float = 0.45
    gate_lr: float | None = None
    steps: int = 50
    threshold: float = 0.5
    n_irrelevant: int = 4
    corpus: str | None = None
    irrelevant: tuple[str, ...] | None = None
    seed: int = 0

    def _defaults(self, model: Any) -> dict[str, Any]:
        return {"layer": model.spec.layer_at(27 / 31)}


class DEFER(Method):
    name = "defer"
    HParams = DEFERHParams

    def compute(self, model: Any, hp: DEFERHParams, requests: Sequence[EditRequest],
                originals: dict[str, torch.Tensor]) -> tuple[list[Component], dict[str, Any]]:
        if not 0 < hp.threshold < 1:
            raise EditError(f"threshold must be in (0, 1), not {hp.threshold}")
        path = model.spec.path(hp.layer, "mlp_out")
        watch = Stopwatch()
        current = adaptors(model).get(path)
        if current is not None and not isinstance(current, DeferralAdaptor):
            raise EditError(f"{path} already carries a {type(current).__name__}; DEFER needs its own adaptor there")
        start = _clone(current.state) if current is not None else self._initial(model, path)
        with watch("train"):
            after, info = self._train(model, hp, path, start, requests, current)
        version = current.version if current is not None else -1
        info["timing"] = watch.report()
        return [DeferralEdit(path, None if current is None else _clone(current.state), after, hp.threshold,
                             version, version + 1)], info

    @staticmethod
    def _initial(model: Any, path: str) -> dict[str, torch.Tensor]:
        """Gate 0 (σ = 0.5), adaptor = a copy of ``W_out`` (and its bias): deferring changes nothing yet."""
        module = get_module(model.module, path)
        w = module.weight.detach().float().cpu()
        w = w.T if is_conv1d(module) else w
        bias = getattr(module, "bias", None)
        return {"gate_w": torch.zeros(w.shape[1]), "gate_b": torch.zeros(()), "value_w": w.clone(),
                "value_b": bias.detach().float().cpu().clone() if bias is not None else torch.zeros(w.shape[0])}

    @staticmethod
    def _train(model: Any, hp: DEFERHParams, path: str, start: dict[str, torch.Tensor],
               requests: Sequence[EditRequest], current: DeferralAdaptor | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        device = model.device
        pool = list(hp.irrelevant) if hp.irrelevant else unrelated_sentences(model, hp.corpus)
        edit = encode(model, [r.prompt for r in requests], [r.target_new for r in requests]).to(device)
        unrelated = [s for sample in sample_per_request(requests, pool, hp.n_irrelevant, hp.seed) for s in sample]
        width = edit.input_ids.shape[1]
        gate_on = torch.zeros(edit.input_ids.shape, dtype=torch.bool, device=device)
        for b, n_target in enumerate(edit.target_lengths):  # from the last prompt token to the end
            gate_on[b, width - n_target - 1:] = True
        n_target_tokens = edit.target_mask.sum(1).clamp(min=1)
        params = {k: v.to(device).clone().requires_grad_(True) for k, v in start.items()}
        blocks = get_module(model.module, model.spec.blocks)
        if current is not None:
            current.detach()  # training replaces the layer output itself
        loss = nll = bce = torch.zeros(())
        try:
            off_keys = torch.zeros(0, start["gate_w"].shape[0], device=device)
            with torch.no_grad():
                on_keys = read_module(model, edit, path).float()[gate_on]
                if unrelated:
                    other = encode(model, unrelated).to(device)
                    off_keys = read_module(model, other, path).float()[other.attention_mask > 0]
            gate_lr = hp.gate_lr or hp.gate_step / float(torch.cat([on_keys, off_keys]).abs().sum(-1).mean().clamp(min=1e-6))
            optimizer = torch.optim.Adam([
                {"params": [params["gate_w"], params["gate_b"]], "lr": gate_lr},
                {"params": [params["value_w"], params["value_b"]], "lr": hp.lr}])
            labels = torch.cat([torch.ones(len(on_keys), device=device), torch.zeros(len(off_keys), device=device)])
            with ReplayBelow(blocks, model.spec._layer(hp.layer)), torch.enable_grad():
                gates: dict[str, torch.Tensor] = {}

                def mix(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                    a = x.float()
                    g = torch.sigmoid(a @ params["gate_w"] + params["gate_b"])
                    gates["g"] = g
                    u = a @ params["value_w"].T + params["value_b"]
                    return (g[..., None] * u + (1 - g[..., None]) * out.float()).to(out.dtype)

                module = get_module(model.module, path)
                handle = module.register_forward_hook(lambda _m, args, out: mix(args[0], out))
                try:
                    for _ in range(hp.steps):
                        nll = -(target_logprobs(model, edit).sum(1) / n_target_tokens).mean()
                        g_off = torch.sigmoid(off_keys @ params["gate_w"] + params["gate_b"])
                        bce = torch.nn.functional.binary_cross_entropy(torch.cat([gates["g"][gate_on], g_off]), labels)
                        loss = nll + bce
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                finally:
                    handle.remove()
        finally:
            if current is not None:
                current.attach(model)
        return _clone(params), {"loss": round(float(loss.detach()), 4), "nll": round(float(nll.detach()), 4),
                                 "bce": round(float(bce.detach()), 4), "gate_lr": float(f"{gate_lr:.3g}")}
