"""Editing methods, registered by name. ``edit(model, requests, method="ft-m", **hparams) -> Patch``."""
from __future__ import annotations

from typing import Any, Sequence

from lmedit.errors import EditError
from lmedit.methods.base import HParams, Method, weight_transaction
from lmedit.methods.defer import DEFER
from lmedit.methods.finetune import FTEWC, FTL, FTM, LoRA
from lmedit.methods.grace import GRACE
from lmedit.methods.ike import IKE
from lmedit.methods.knowledge_neurons import KnowledgeNeurons
from lmedit.methods.memit import EMMET, MEMIT, PMET, AlphaEdit
from lmedit.methods.noop import NoEdit
from lmedit.methods.rome import ROME
from lmedit.methods.wise import WISE
from lmedit.patch import Patch
from lmedit.requests import EditRequest

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (FTM, FTL, LoRA, FTEWC, ROME, MEMIT, PMET, EMMET, AlphaEdit, KnowledgeNeurons, GRACE, WISE, DEFER, IKE, NoEdit)}


def list_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str, **hparams: Any) -> Method:
    """An instance of the method registered as ``name`` (case-insensitive; ``ft_m`` = ``ft-m``)."""
    if not isinstance(name, str):
        raise EditError(f"a method is named by a string, not {type(name).__name__}; available: {', '.join(list_methods())}")
    key = name.lower().replace("_", "-")
    if key not in METHODS:
        raise EditError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    return METHODS[key](**hparams)


def edit(model: Any, requests: EditRequest | Sequence[EditRequest], method: str = "ft-m", *, apply: bool = False,
         **hparams: Any) -> Patch:
    """Edit ``model`` with ``method``; returns the ``Patch`` (applied in place if ``apply``)."""
    patch = get_method(method, **hparams).edit(model, requests)
    if apply:
        patch.apply(model)
    return patch


__all__ = ["HParams", "METHODS", "Method", "edit", "get_method", "list_methods", "weight_transaction"]
