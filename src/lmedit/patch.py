"""``Patch``: the one result type of every editing and steering method.

A patch is a list of *components*, each of which knows how to apply itself to a model and revert
exactly. Today's component is ``WeightDelta`` (``W ← W + ΔW``, dense or low-rank ``ΔW = L R``);
methods that add modules or transform inputs add their own component types to ``COMPONENTS``.

Guarantees:
  * ``revert()`` restores every touched parameter **bit for bit** (originals are kept while applied,
    never recomputed as ``W + ΔW − ΔW``).
  * Patches stack: applying B on top of A is allowed, reverting must go in reverse order (LIFO).
  * ``save(dir)`` writes ``patch.json`` (method, hyper-parameters, requests, base fingerprint, component
    manifests) and ``tensors.safetensors``; ``Patch.load(dir)`` reads them back, and applying a patch to
    a model with another fingerprint is refused.
  * ``Patch.compose([a, b, …])`` is one patch equivalent to applying ``a`` then ``b`` … (sequential editing).
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch

from lmedit.errors import LmeditError, PatchError
from lmedit.models.loading import require_model
from lmedit.requests import EditRequest

FORMAT_VERSION = 1


class Component:
    """A reversible change to a model. Subclasses set ``kind`` and implement the five methods.

    ``memory`` components change no weight: they add to state kept beside the model (recorded keys,
    codebooks), which the sequential evaluation checkpoints separately.
    """

    kind: ClassVar[str]
    memory: ClassVar[bool] = False

    def apply(self, model: Any) -> None:
        raise NotImplementedError

    def revert(self, model: Any) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        """Drop whatever state ``revert`` would need (see ``Patch.commit``)."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to save, by local name."""
        raise NotImplementedError

    def manifest(self) -> dict[str, Any]:
        """JSON-serialisable description (without tensors)."""
        raise NotImplementedError

    @classmethod
    def restore(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "Component":
        raise NotImplementedError


def weight_plus_delta(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``W + ΔW`` as every patch writes it: summed in float32, stored in the weight's dtype. Anything that
    must reproduce an applied patch bit for bit (a resumed sequential run) forms the sum here."""
    return (weight.float() + delta).to(weight.dtype)


@dataclass(eq=False)
class WeightDelta(Component):
    """``W ← W + ΔW`` for one parameter, with ``ΔW`` dense or low-rank (``ΔW = left @ right``).

    ``ΔW`` is in the parameter's own storage layout and kept in float32; the sum is formed in float32
    and cast to the parameter's dtype.
    """

    kind: ClassVar[str] = "weight_delta"
    param: str
    delta: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    _backup: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.delta is None) == (self.left is None or self.right is None):
            raise PatchError("a WeightDelta needs either a dense delta or both low-rank factors")

    def dense(self) -> torch.Tensor:
        return self.delta if self.delta is not None else self.left @ self.right  # type: ignore[operator]

    def apply(self, model: Any) -> None:
        p = model.parameter(self.param)
        delta = self.dense().to(device=p.device, dtype=torch.float32)
        if delta.shape != p.shape:
            raise PatchError(f"the patch's delta for {self.param} has shape {tuple(delta.shape)}, the model's "
                             f"parameter {tuple(p.shape)}")
        self._backup = p.detach().clone()
        with torch.no_grad():
            p.copy_(weight_plus_delta(p, delta))

    def revert(self, model: Any) -> None:
        if self._backup is None:
            raise PatchError(f"the delta for {self.param} is not applied")
        with torch.no_grad():
            model.parameter(self.param).copy_(self._backup)
        self._backup = None

    def commit(self) -> None:
        self._backup = None

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.delta is not None:
            return {"delta": self.delta}
        return {"left": self.left, "right": self.right}  # type: ignore[dict-item]

    def manifest(self) -> dict[str, Any]:
        return {"param": self.param, "rank": None if self.delta is not None else int(self.left.shape[1])}  # type: ignore[union-attr]

    @classmethod
    def restore(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "WeightDelta":
        return cls(manifest["param"], tensors.get("delta"), tensors.get("left"), tensors.get("right"))


@dataclass(eq=False)
class EditedKeys(Component):
    """The keys an edit wrote into ``W_out`` of one parameter (rows of ``keys``, ``[n, d_mlp]``).

    Changes no weight: while applied it is listed in ``model.cache["edited_keys"]``, where methods that
    protect earlier edits (AlphaEdit in sequential use) find the keys to preserve. Reverting the patch
    forgets them, so that state always matches the edits actually applied.
    """

    kind: ClassVar[str] = "edited_keys"
    memory: ClassVar[bool] = True
    param: str
    keys: torch.Tensor

    def apply(self, model: Any) -> None:
        model.cache.setdefault("edited_keys", []).append(self)

    def revert(self, model: Any) -> None:
        listed = model.cache.get("edited_keys", [])
        if not any(c is self for c in listed):
            raise PatchError(f"the edited keys of {self.param} are not applied")
        model.cache["edited_keys"] = [c for c in listed if c is not self]

    def commit(self) -> None:
        pass  # the keys stay listed on the model for as long as it lives

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys}

    def manifest(self) -> dict[str, Any]:
        return {"param": self.param, "count": int(self.keys.shape[0])}

    @classmethod
    def restore(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "EditedKeys":
        return cls(manifest["param"], tensors["keys"])


def edited_keys(model: Any, param: str) -> torch.Tensor | None:
    """All keys applied edits recorded for ``param`` (``[n, d_mlp]``), or ``None``."""
    rows = [c.keys for c in model.cache.get("edited_keys", []) if c.param == param]
    return torch.cat(rows) if rows else None


COMPONENTS: dict[str, type[Component]] = {WeightDelta.kind: WeightDelta, EditedKeys.kind: EditedKeys}


@dataclass(eq=False)
class Patch:
    """The result of an edit: reversible, saveable, composable.

    Attributes:
        method: the editing method's registered name.
        hparams: its fully resolved hyper-parameters.
        requests: the edit requests it implements.
        base_fingerprint: fingerprint of the model it was computed for.
        components: the changes, applied in order and reverted in reverse order.
        info: free-form measurements (wall time, losses, steps).
    """

    method: str
    hparams: dict[str, Any]
    requests: list[EditRequest]
    base_fingerprint: str
    components: list[Component]
    info: dict[str, Any] = field(default_factory=dict)
    _model: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------------- apply / revert
    @property
    def is_applied(self) -> bool:
        return self._model is not None

    def apply(self, model: Any) -> "Patch":
        """Apply to ``model`` in place. All-or-nothing: on failure the model is left as it was."""
        if self._model is not None:
            raise PatchError("this patch is already applied; revert it first")
        model = require_model(model, PatchError)
        if model.fingerprint != self.base_fingerprint:
            raise PatchError(
                f"this patch was made for the model with fingerprint {self.base_fingerprint[:12]}, not "
                f"{model.name!r} ({model.fingerprint[:12]}); load the model it was made for"
            )
        done: list[Component] = []
        try:
            for component in self.components:
                component.apply(model)
                done.append(component)
        except BaseException:
            for component in reversed(done):
                component.revert(model)
            raise
        self._model = model
        model.applied.append(self)
        return self

    def revert(self, model: Any | None = None) -> "Patch":
        """Restore every parameter the patch touched, bit for bit."""
        if self._model is None:
            raise PatchError("this patch is not applied")
        if model is not None and model is not self._model:
            raise PatchError("this patch is applied to another model")
        model = self._model
        if model.applied and model.applied[-1] is not self:
            raise PatchError("patches must be reverted in reverse order: revert the ones applied after this first")
        for component in reversed(self.components):
            component.revert(model)
        model.applied.remove(self)
        self._model = None
        return self

    def commit(self) -> "Patch":
        """Forget how to revert: the applied change becomes part of the model's weights.

        For long sequential runs that keep their own snapshot of the original weights (one copy for
        the whole run instead of one per patch). The patch is no longer applied afterwards.
        """
        if self._model is None:
            raise PatchError("this patch is not applied")
        if self._model.applied and self._model.applied[-1] is not self:
            raise PatchError("only the most recently applied patch can be committed")
        for component in self.components:
            component.commit()
        self._model.applied.remove(self)
        self._model = None
        return self

    @contextmanager
    def applied(self, model: Any) -> Iterator[Any]:
        """``with patch.applied(model): ...`` — applied inside the block, reverted on exit."""
        self.apply(model)
        try:
            yield model
        finally:
            self.revert(model)

    # ------------------------------------------------------------------------- composition
    @classmethod
    def compose(cls, patches: Sequence["Patch"]) -> "Patch":
        """One patch equivalent to applying ``patches`` in order (sequential editing)."""
        if not patches:
            raise PatchError("nothing to compose")
        fingerprints = {p.base_fingerprint for p in patches}
        if len(fingerprints) > 1:
            raise PatchError("cannot compose patches made for different base models")
        methods = {p.method for p in patches}
        return cls(
            method=methods.pop() if len(methods) == 1 else "composed",
            hparams=patches[0].hparams if len({json.dumps(p.hparams, sort_keys=True, default=str) for p in patches}) == 1
            else {"parts": [{"method": p.method, "hparams": p.hparams} for p in patches]},
            requests=[r for p in patches for r in p.requests],
            base_fingerprint=fingerprints.pop(),
            components=[_fresh(c) for p in patches for c in p.components],
            info={"composed_of": len(patches)},
        )

    def __add__(self, other: "Patch") -> "Patch":
        return Patch.compose([self, other])

    # ------------------------------------------------------------------------- save / load
    def save(self, directory: str | Path) -> Path:
        """Write ``patch.json`` and ``tensors.safetensors`` into ``directory`` (created if needed)."""
        from safetensors.torch import save_file

        import lmedit

        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file in the way, no permission, a read-only disk
            raise PatchError(f"cannot save the patch to {directory}: {e.strerror or e}") from e
        tensors: dict[str, torch.Tensor] = {}
        manifests = []
        for i, component in enumerate(self.components):
            for name, t in component.tensors().items():
                tensors[f"{i}.{name}"] = t.detach().to("cpu").contiguous()
            manifests.append({"kind": component.kind, **component.manifest()})
        manifest = {
            "format": FORMAT_VERSION,
            "lmedit_version": lmedit.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "method": self.method,
            "hparams": self.hparams,
            "base_fingerprint": self.base_fingerprint,
            "requests": [r.to_dict() for r in self.requests],
            "components": manifests,
            "info": self.info,
        }
        try:
            save_file(tensors, str(directory / "tensors.safetensors"))
            (directory / "patch.json").write_text(json.dumps(manifest, indent=2, default=str))
        except OSError as e:  # disk full, permissions
            raise PatchError(f"cannot save the patch to {directory}: {e.strerror or e}") from e
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Patch":
        """Read a patch written by ``save``. Corrupt or incomplete directories raise ``PatchError``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / "patch.json").is_file():
            raise PatchError(f"{directory} is not a saved patch (no patch.json)")
        try:
            manifest = json.loads((directory / "patch.json").read_text())
            tensors = load_file(str(directory / "tensors.safetensors"))
        except (OSError, json.JSONDecodeError, SafetensorError) as e:
            raise PatchError(f"cannot read the patch in {directory}: {str(e).splitlines()[0]}") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise PatchError(f"{directory} has patch format {manifest.get('format')!r}; this lmedit reads {FORMAT_VERSION}")
        try:
            components = []
            for i, cm in enumerate(manifest["components"]):
                if cm["kind"] not in COMPONENTS:
                    import lmedit.methods  # noqa: F401  (methods register their own component kinds)
                kind = COMPONENTS.get(cm["kind"])
                if kind is None:
                    raise PatchError(f"{directory}: unknown component kind {cm['kind']!r}")
                prefix = f"{i}."
                own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                components.append(kind.restore(cm, own))
            return cls(
                method=manifest["method"],
                hparams=manifest["hparams"],
                requests=[EditRequest.from_dict(r) for r in manifest["requests"]],
                base_fingerprint=manifest["base_fingerprint"],
                components=components,
                info=manifest.get("info", {}),
            )
        except LmeditError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise PatchError(f"the patch in {directory} is malformed ({type(e).__name__}: {e})") from None

    def __repr__(self) -> str:
        state = "applied" if self.is_applied else "not applied"
        return f"Patch(method={self.method!r}, requests={len(self.requests)}, components={len(self.components)}, {state})"


def _fresh(component: Component) -> Component:
    """A copy of a component without any applied state (so a composed patch applies independently)."""
    return type(component).restore(component.manifest(), component.tensors())
