"""lmedit: edit, steer and inspect the knowledge inside causal language models.

The top-level names are imported lazily so that ``import lmedit`` (and ``lmedit --help``) stays fast;
torch and transformers are imported on first use.

    >>> import lmedit
    >>> model = lmedit.load_model("smollm2-135m")
    >>> request = lmedit.EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome")
    >>> patch = lmedit.edit(model, request, method="ft-m")
    >>> with patch.applied(model):
    ...     print(lmedit.generate(model, request.prompt))
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "lmedit.models",
    "Model": "lmedit.models",
    "ModelSpec": "lmedit.models",
    "bundled_models": "lmedit.models",
    "EditRequest": "lmedit.requests",
    "Patch": "lmedit.patch",
    "edit": "lmedit.methods",
    "get_method": "lmedit.methods",
    "list_methods": "lmedit.methods",
    "generate": "lmedit.continuations",
    "score_continuations": "lmedit.continuations",
    "LmeditError": "lmedit.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lmedit' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from lmedit.errors import LmeditError
    from lmedit.methods import edit, get_method, list_methods
    from lmedit.models import Model, ModelSpec, bundled_models, load_model
    from lmedit.patch import Patch
    from lmedit.requests import EditRequest
    from lmedit.continuations import generate, score_continuations
