"""GRACE (Hartvigsen et al. 2023): a discrete key→value codebook beside one layer, for lifelong editing.

The codebook sits on ``W_out`` of one layer (an ``Adaptor``, no weight changes). Each entry is
``(key k, value v, radius ε, label y)``. At every position, the layer's input ``x`` is compared with
the keys (Euclidean distance); if the nearest key is within its radius, the layer's output at that
position is replaced by the entry's value, otherwise the layer runs unchanged.

An edit ``(prompt, y)`` takes ``k`` = the layer input at the prompt's last token and the nearest entry
``e`` (distance ``d``):

* no entry, or ``d > ε_e + ε_init``: **add** ``(k, v, ε_init, y)`` and train ``v``;
* ``d ≤ ε_e + ε_init`` and ``y_e = y``: **expand** ``ε_e ← max(ε_e, d)`` (the new key now maps to ``v_e``);
* ``d ≤ ε_e + ε_init`` and ``y_e ≠ y``: **split** ``ε_e ← d/2`` and add ``(k, v, d/2, y)``.

Training a value: ``v`` replaces the layer output at the prompt's last token and minimises the target's
teacher-forced NLL (Adam, lr 1.0, as in the reference toolkit's GRACE; up to 100 steps, stopping when
the mean token NLL < 0.01; ``optimizer="sgd"`` is the paper's plain gradient descent, which on
SmolLM2 needs ~10x the steps);
``v`` starts from the layer's current output there ("warm" start; ``value_init="cold"`` starts from
zeros). Defaults: the layer at the depth fraction of Llama-7B's 27 of 32, ``ε_init = 1.0``.

**Values behind a post-MLP norm** (lmedit's change; ``sphere``, on by default where ``spec.mlp_post_norm`` is set:
Gemma-2/3, OLMo-2). There the stream receives ``N(v) = g ⊙ v / rms(v)``, which ignores ``v``'s scale: the NLL's
gradient is orthogonal to ``v``, every step lengthens it, and Adam's fixed step ``lr`` turns the direction less
and less (~``lr/‖v‖``). On Gemma-3-270M (layer 15, the first five ZsRE edits, ``‖v₀‖`` ≈ 2, so a coordinate's rms
≈ 0.08 against lr 1.0) the value's NLL after all 100 steps was 0.64 / 0.07 / 0.48 / 0.10 / 1.62 as ``‖v‖`` grew
tenfold. With ``sphere`` the value stays on ``‖v‖ = ‖v₀‖`` (projected back after each step: ``v ← v‖v₀‖/‖v‖``)
and Adam's step is ``lr · rms(v₀)``, the same step relative to the value's coordinates that lr 1.0 is on a model
without the norm: the same five edits reach NLL < 0.01 in 43 / 11 / 27 / 11 / 15 steps.
Known weakness (by design): keys are exact states, so rephrased prompts rarely fall inside a ball.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Sequence

import torch

from lmedit.adaptors import Adaptor, adaptors, drop_if_empty, get_or_attach, restore, snapshot
from lmedit.errors import PatchError
from lmedit.hooks import Hooks, ReplayBelow, read_module
from lmedit.methods.base import HParams, Method, Stopwatch
from lmedit.models.spec import get_module
from lmedit.patch import COMPONENTS, Component
from lmedit.requests import EditRequest
from lmedit.scoring import encode, forward_logits, target_logprobs


class Codebook(Adaptor):
    """GRACE's codebook on one module (see the module docstring)."""

    transient = ("_handle", "_squared_norms")

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.ids: list[str] = []
        self.labels: list[str] = []
        self.keys = torch.zeros(0)
        self.values = torch.zeros(0)
        self.eps = torch.zeros(0)
        self._squared_norms: torch.Tensor | None = None  # ‖k‖² per entry, recomputed when entries change

    def is_empty(self) -> bool:
        return not self.ids

    def add(self, ids: Sequence[str], keys: torch.Tensor, values: torch.Tensor, eps: torch.Tensor,
            labels: Sequence[str]) -> None:
        if set(ids) & set(self.ids):
            raise PatchError(f"codebook entries {sorted(set(ids) & set(self.ids))} are already in {self.path}")
        keys, values, eps = keys.float().cpu(), values.float().cpu(), eps.float().cpu()
        self.keys = keys if self.is_empty() else torch.cat([self.keys, keys])
        self.values = values if self.is_empty() else torch.cat([self.values, values])
        self.eps = eps if self.is_empty() else torch.cat([self.eps, eps])
        self.ids += list(ids)
        self.labels += list(labels)
        self._squared_norms = None

    def remove(self, ids: Sequence[str]) -> None:
        keep = [i for i, x in enumerate(self.ids) if x not in set(ids)]
        self.keys, self.values, self.eps = self.keys[keep], self.values[keep], self.eps[keep]
        self.ids = [self.ids[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]
        self._squared_norms = None

    def as_component(self) -> "CodebookEdit":
        """The whole codebook as one component (applied to a model without one, it recreates it)."""
        return CodebookEdit(self.path, list(self.ids), self.keys.clone(), self.values.clone(), self.eps.clone(),
                            list(self.labels), {})

    def nearest(self, key: torch.Tensor) -> tuple[int, float] | None:
        """(index, distance) of the entry whose key is nearest to ``key``."""
        if self.is_empty():
            return None
        d = torch.linalg.vector_norm(self.keys - key.float().cpu()[None], dim=1)
        j = int(d.argmin())
        return j, float(d[j])

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        if self.is_empty():
            return None
        keys = self.keys.to(x.device)
        flat = x.reshape(-1, x.shape[-1]).float()
        # nearest entry by ‖k‖² − 2 x·k (‖x − k‖² up to the row's constant ‖x‖²): one matrix product, so a
        # query against 10k entries stays cheap; the chosen entry's distance is then computed exactly
        if self._squared_norms is None or self._squared_norms.device != x.device:
            self._squared_norms = (keys * keys).sum(1)
        idx = (self._squared_norms[None] - 2 * flat @ keys.T).argmin(dim=1)
        dist = torch.linalg.vector_norm(flat - keys[idx], dim=1)
        hit = dist <= self.eps.to(x.device)[idx]
        if not bool(hit.any()):
            return None
        new = out.reshape(-1, out.shape[-1]).clone()
        new[hit] = self.values.to(out.device)[idx[hit]].to(out.dtype)
        return new.reshape(out.shape)


@dataclass(eq=False)
class CodebookEdit(Component):
    """The entries one GRACE edit adds to a codebook and the radii it changes (exactly reversible)."""

    kind: ClassVar[str] = "codebook_edit"
    memory: ClassVar[bool] = True
    path: str
    ids: list[str]
    keys: torch.Tensor
    values: torch.Tensor
    eps: torch.Tensor
    labels: list[str]
    radius: dict[str, tuple[float, float]] = field(default_factory=dict)  # entry id → (before, after)

    def apply(self, model: Any) -> None:
        book = get_or_attach(model, self.path, Codebook)
        missing = [i for i in self.radius if i not in book.ids and i not in self.ids]
        if missing:
            raise PatchError(f"this GRACE patch changes codebook entries {missing} that are not applied on {self.path} "
                             "(apply the earlier GRACE patches first)")
        if self.ids:
            book.add(self.ids, self.keys, self.values, self.eps, self.labels)
        for entry, (_, after) in self.radius.items():
            book.eps[book.ids.index(entry)] = after

    def revert(self, model: Any) -> None:
        book = adaptors(model).get(self.path)
        if not isinstance(book, Codebook) or any(i not in book.ids for i in self.ids):
            raise PatchError(f"the codebook entries of this patch are not applied on {self.path}")
        for entry, (before, _) in self.radius.items():
            if entry in book.ids:
                book.eps[book.ids.index(entry)] = before
        book.remove(self.ids)
        drop_if_empty(model, self.path)

    def commit(self) -> None:
        pass  # the entries stay in the model's codebook

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "eps": self.eps}

    def manifest(self) -> dict[str, Any]:
        return {"path": self.path, "ids": self.ids, "labels": self.labels,
                "radius": {k: list(v) for k, v in self.radius.items()}}

    @classmethod
    def restore(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "CodebookEdit":
        return cls(manifest["path"], list(manifest["ids"]), tensors["keys"], tensors["values"], tensors["eps"],
                   list(manifest["labels"]), {k: (float(a), float(b)) for k, (a, b) in manifest["radius"].items()})


COMPONENTS[CodebookEdit.kind] = CodebookEdit


@dataclass
class GRACEHParams(HParams):
    """Hyper-parameters of GRACE (see the module docstring)."""

    layer: int | None = None
    eps_init: float = 1.0
    lr: float = 1.0
    steps: int = 100
    stop_loss: float = 0.01
    value_init: Literal["warm", "cold"] = "warm"
    optimizer: Literal["adam", "sgd"] = "adam"
    sphere: bool | None = None  # keep ‖v‖ fixed, step lr·rms(v₀); default: on behind a post-MLP norm

    def _defaults(self, model: Any) -> dict[str, Any]:
        return {"layer": model.spec.layer_at(27 / 31), "sphere": model.spec.mlp_post_norm is not None}


def _label(target: str) -> str:
    return " ".join(target.split()).lower()


class GRACE(Method):
    name = "grace"
    HParams = GRACEHParams

    def compute(self, model: Any, hp: GRACEHParams, requests: Sequence[EditRequest],
                originals: dict[str, torch.Tensor]) -> tuple[list[Component], dict[str, Any]]:
        path = model.spec.path(hp.layer, "mlp_out")
        watch = Stopwatch()
        saved = snapshot(model)
        added: dict[str, tuple[torch.Tensor, torch.Tensor, float, str]] = {}
        radius: dict[str, tuple[float, float]] = {}
        counts = {"added": 0, "expanded": 0, "split": 0}
        value_steps: list[int] = []  # per trained value: optimiser steps taken, and the target's final mean NLL
        value_losses: list[float] = []
        try:
            book = get_or_attach(model, path, Codebook)
            for request in requests:  # one after another: later requests see the earlier entries
                with watch("keys"):
                    key, position = self._key(model, path, request.prompt)
                label = _label(request.target_new)
                near = book.nearest(key)
                new_eps = hp.eps_init
                if near is not None and near[1] <= float(book.eps[near[0]]) + hp.eps_init:
                    j, d = near
                    entry = book.ids[j]
                    before = radius.get(entry, (float(book.eps[j]), 0.0))[0]
                    if book.labels[j] == label:  # expand: the new key maps to the entry's value
                        book.eps[j] = max(float(book.eps[j]), d)
                        radius[entry] = (before, float(book.eps[j]))
                        counts["expanded"] += 1
                        continue
                    book.eps[j] = d / 2  # split: both balls shrink to meet halfway
                    radius[entry] = (before, d / 2)
                    new_eps = d / 2
                    counts["split"] += 1
                with watch("values"):
                    value, steps, loss = self._train_value(model, hp, path, request, position)
                value_steps.append(steps)
                value_losses.append(loss)
                entry = uuid.uuid4().hex[:16]
                book.add([entry], key[None], value[None], torch.tensor([new_eps]), [label])
                added[entry] = (key, value, new_eps, label)
                counts["added"] += 1
        finally:
            restore(model, saved)
        ids = list(added)
        d_in = model.spec.mlp_size
        change = CodebookEdit(
            path, ids,
            torch.stack([added[i][0].float().cpu() for i in ids]) if ids else torch.zeros(0, d_in),
            torch.stack([added[i][1].float().cpu() for i in ids]) if ids else torch.zeros(0, model.spec.hidden_size),
            torch.tensor([added[i][2] for i in ids], dtype=torch.float32), [added[i][3] for i in ids],
            {k: v for k, v in radius.items() if k not in added})
        # radii of entries added in this same edit are already final in ``eps``
        for k, (_, after) in radius.items():
            if k in added:
                change.eps[ids.index(k)] = after
        return [change], {**counts, "codebook_size": len(saved[path].ids) + len(ids) if path in saved else len(ids),
                          "value_steps": value_steps, "value_nll": value_losses, "timing": watch.report()}

    @staticmethod
    @torch.no_grad()
    def _key(model: Any, path: str, prompt: str) -> tuple[torch.Tensor, int]:
        """The layer input at the prompt's last token, and that token's position."""
        batch = encode(model, [prompt])
        return read_module(model, batch, path)[0, -1].float().clone(), batch.input_ids.shape[1] - 1

    @staticmethod
    def _train_value(model: Any, hp: GRACEHParams, path: str, request: EditRequest,
                     position: int) -> tuple[torch.Tensor, int, float]:
        """``v`` minimising the target's NLL when it replaces the layer output at ``position`` (with
        ``hp.sphere``: on the sphere ``‖v‖ = ‖v₀‖`` of the layer's own output there, Adam's step scaled by
        ``rms(v₀)``; see the module docstring), with the steps taken and the target's last mean NLL."""
        batch = encode(model, [request.prompt], [request.target_new])
        at = position + batch.input_ids.shape[1] - batch.prompt_lengths[0] - batch.target_lengths[0]  # left padding
        with torch.no_grad(), Hooks(model.module) as hooks:
            out = hooks.read(path, "output")
            forward_logits(model, batch, last=1)
            start = hooks[out][0, at].float()
        value = (start.clone() if hp.value_init == "warm" else torch.zeros_like(start)).requires_grad_(True)
        start_norm = start.norm()  # ‖v₀‖, the sphere's radius with ``hp.sphere``
        lr = hp.lr * float(start_norm) / start.numel() ** 0.5 if hp.sphere else hp.lr
        optimizer = (torch.optim.Adam if hp.optimizer == "adam" else torch.optim.SGD)([value], lr=lr)

        def put(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[:, :at], value.to(t.dtype)[None, None].expand(t.shape[0], 1, -1), t[:, at + 1:]], dim=1)

        blocks = get_module(model.module, model.spec.blocks)
        with Hooks(model.module) as hooks, ReplayBelow(blocks, model.spec._layer(hp.layer)), torch.enable_grad():
            hooks.replace(path, "output", put)
            for step in range(hp.steps + 1):
                logp = target_logprobs(model, batch)
                loss = -(logp.sum() / batch.target_mask.sum())
                if float(loss.detach()) < hp.stop_loss or step == hp.steps:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if hp.sphere:
                    with torch.no_grad():
                        value.mul_(start_norm / value.norm().clamp(min=1e-12))
        return value.detach(), step, round(float(loss.detach()), 4)
