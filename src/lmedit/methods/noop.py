"""``none``: the editor that changes nothing — a control for evaluation and benchmarks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lmedit.methods.base import HParams, Method
from lmedit.patch import Component
from lmedit.requests import EditRequest


@dataclass
class NoEditHParams(HParams):
    pass


class NoEdit(Method):
    """Returns an empty patch: scores measure the unedited model through the full edit protocol."""

    name = "none"
    HParams = NoEditHParams

    def compute(self, model: Any, hp: HParams, requests: Sequence[EditRequest],
                originals: dict[str, torch.Tensor]) -> tuple[list[Component], dict[str, Any]]:
        return [], {}
