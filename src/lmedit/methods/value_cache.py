"""On-disk cache of the locate-then-edit methods' optimised values v* (``keyvalue.optimize_values``)."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import torch

from lmedit.adaptors import adaptors
from lmedit.models.bundled import cache_dir
from lmedit.requests import EditRequest


class ValueStore:
    """On-disk cache of each request's optimised values, so a long mass edit that is killed resumes where it
    stopped, and MEMIT / EMMET / AlphaEdit runs with the same settings share them, edited one at a time or in
    one batch (a request's v* does not depend on the requests optimised beside it).

    Keyed by the model's *current* state, the layer, sites, templates, settings and the requests
    themselves; stored under ``$LMEDIT_CACHE/values/``. The state is a hash of 4,096 strided float32
    samples of every parameter (which any dense change moves: fine-tuning, rank-one and least-squares
    updates) and of ``edit_digest``: the applied patches and the adaptors in full (which a change to a few
    of ``W_out``'s columns — a KN edit — or to a side memory would slip past the samples).
    """

    def __init__(self, model: Any, layer: int, templates: Sequence[str], cfg: Any, sites: Sequence[str]) -> None:
        h = hashlib.sha256()
        for name, p in model.module.named_parameters():
            flat = p.detach().reshape(-1)
            h.update(name.encode())
            h.update(flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu().numpy().tobytes())
        h.update(repr(sorted(model.cache.get("adaptors", {}))).encode())
        digest = edit_digest(model)
        if digest is not None:  # (an unedited model's keys are those of earlier versions: caches stay valid)
            h.update(digest)
        h.update(json.dumps([layer, list(templates), list(sites), getattr(model, "doc_start", None),
                             {k: v for k, v in vars(cfg).items()  # (an unset prompt_share keeps older keys)
                              if k not in ("group", "cache") and not (k == "prompt_share" and v is None)}]).encode())
        self.state = h.hexdigest()[:20]
        self.folder = cache_dir() / "values" / self.state

    def _path(self, request: EditRequest) -> Any:
        key = hashlib.sha256(json.dumps([request.to_dict()], sort_keys=True, default=str).encode())
        return self.folder / f"{key.hexdigest()[:24]}.pt"

    def get(self, request: EditRequest) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None:
        """``(δ [S, 1, d], v̄ [S, 1, d], info)`` of ``request``, or ``None`` when not cached."""
        path = self._path(request)
        if not path.exists():
            return None
        delta, v_bar, info = torch.load(path)
        if isinstance(info["steps"], int):  # written before steps were recorded per request
            info["steps"] = [info["steps"]]
        return delta, v_bar, info

    def put(self, request: EditRequest, value: tuple[torch.Tensor, torch.Tensor, dict[str, Any]]) -> None:
        path = self._path(request)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(value, tmp)
        tmp.replace(path)


def edit_digest(model: Any) -> bytes | None:
    """A hash of every patch applied to ``model`` (not committed) and of every adaptor's whole state, by
    their components' manifests and tensors; ``None`` when there is neither."""
    components = [c for patch in model.applied for c in patch.components]
    components += [a.as_component() for _, a in sorted(adaptors(model).items())]
    if not components:
        return None
    h = hashlib.sha256()
    for component in components:
        h.update(json.dumps([component.kind, component.manifest()], sort_keys=True, default=str).encode())
        for name, tensor in sorted(component.tensors().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.digest()
