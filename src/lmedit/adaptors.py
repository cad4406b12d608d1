"""Adaptors: editable memory that lives *beside* a model's weights (GRACE codebooks, side memories).

An ``Adaptor`` is attached to one module and changes its output through a forward hook. Adaptors are
listed in ``model.cache["adaptors"]`` by module path, at most one per module; patches change them
through components (``apply`` adds entries, ``revert`` removes exactly those), so memory-based edits
compose, save and revert like weight edits. ``snapshot``/``restore`` copy the whole adaptor state
(used by the sequential evaluation to checkpoint and to leave the model as it found it).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lmedit.models.spec import get_module


class Adaptor:
    """Base class: owns one forward hook on ``path``; subclasses implement ``forward``.

    Attributes named in ``transient`` (hook handles, per-call caches) are not copied by ``deepcopy``.
    """

    transient: tuple[str, ...] = ("_handle",)

    def __init__(self, path: str) -> None:
        self.path = path
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def attach(self, model: Any) -> None:
        module = get_module(model.module, self.path)

        def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
            main = output[0] if isinstance(output, tuple) else output
            new = self.forward(args[0], main)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        self._handle = module.register_forward_hook(hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """The module's new output given its input ``x`` and output ``out`` (``None``: unchanged)."""
        raise NotImplementedError

    def is_empty(self) -> bool:
        raise NotImplementedError

    def as_component(self) -> Any:
        """The adaptor's whole state as a patch component (for checkpoints)."""
        raise NotImplementedError

    def __deepcopy__(self, memo: dict) -> "Adaptor":
        clone = copy.copy(self)
        clone.__dict__ = {k: (None if k in self.transient else copy.deepcopy(v, memo)) for k, v in self.__dict__.items()}
        return clone


def adaptors(model: Any) -> dict[str, Adaptor]:
    """The adaptors attached to ``model``, by module path."""
    return model.cache.setdefault("adaptors", {})


def get_or_attach(model: Any, path: str, factory: type[Adaptor], *args: Any) -> Adaptor:
    """The adaptor on ``path``, attaching a new ``factory(path, *args)`` if there is none."""
    table = adaptors(model)
    if path not in table:
        table[path] = factory(path, *args)
        table[path].attach(model)
    elif not isinstance(table[path], factory):
        from lmedit.errors import PatchError

        raise PatchError(f"{path} already carries a {type(table[path]).__name__}, not a {factory.__name__}")
    return table[path]


def drop_if_empty(model: Any, path: str) -> None:
    table = adaptors(model)
    if path in table and table[path].is_empty():
        table.pop(path).detach()


def snapshot(model: Any) -> dict[str, Adaptor]:
    """A detached deep copy of every adaptor's state."""
    return {path: copy.deepcopy(a) for path, a in adaptors(model).items()}


def restore(model: Any, saved: dict[str, Adaptor]) -> None:
    """Replace the model's adaptors by copies of ``saved`` (a ``snapshot``)."""
    for adaptor in adaptors(model).values():
        adaptor.detach()
    table = adaptors(model)
    table.clear()
    for path, adaptor in saved.items():
        table[path] = copy.deepcopy(adaptor)
        table[path].attach(model)
