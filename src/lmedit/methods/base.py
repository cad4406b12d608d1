"""The ``Method`` interface every editor implements, and the transaction that keeps models safe.

A method is a class with a typed hyper-parameter dataclass (``HParams``) and one entry point,
``edit(model, requests) -> Patch``. Fields left as ``None`` in ``HParams`` are derived from the model's
``ModelSpec`` by ``HParams.resolve`` (e.g. the edit layer from a depth fraction).

``edit`` runs the method inside a weight transaction: the parameters the method declares it will
touch are copied first and restored bit for bit afterwards — on success (the change lives in the
returned, unapplied ``Patch``) and on failure alike. All parameters are frozen during the edit, so
only what a method explicitly enables receives gradients.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch

from lmedit.errors import EditError, LmeditError
from lmedit.models.loading import require_model
from lmedit.patch import Component, Patch
from lmedit.requests import EditRequest, as_requests

log = logging.getLogger(__name__)


AT_LEAST_ONE = frozenset({"steps", "rank", "stats_tokens", "fisher_tokens", "shards", "shard_size", "merge_every",
                          "value_group"})
POSITIVE = frozenset({"lr", "gate_lr", "gate_step", "eps_init"})
NON_NEGATIVE = frozenset({"n_irrelevant", "rehearse", "replay", "weight_decay", "kl_factor", "l2", "ridge",
                          "ewc_lambda", "max_neurons", "stop_loss"})
"""Ranges shared by every method's hyper-parameters of these names, checked when an ``HParams`` is built, so
that a bad value is a one-line ``EditError`` before anything runs (not an error from deep inside torch)."""


@dataclass
class HParams:
    """Base class of hyper-parameter dataclasses."""

    def __post_init__(self) -> None:
        # Values from YAML/JSON/CLI arrive as lists or bare ints where a tuple of layers is expected.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
            elif f.name == "layers" and isinstance(value, int):
                setattr(self, f.name, (value,))
            elif _kind(f) == "int" and isinstance(value, float):  # a count given as 9.0 (YAML, a sweep's grid)
                if not value.is_integer():
                    raise EditError(f"{type(self).__name__.removesuffix('HParams')} hyper-parameter {f.name} "
                                    f"must be a whole number, not {value}")
                setattr(self, f.name, int(value))
            _check_range(type(self).__name__.removesuffix("HParams"), f, getattr(self, f.name))

    def resolve(self, model: Any) -> "HParams":
        """A copy with model-derived defaults filled in (subclasses override ``_defaults``)."""
        filled = {k: v for k, v in self._defaults(model).items() if getattr(self, k) is None}
        return dataclasses.replace(self, **filled)

    def _defaults(self, model: Any) -> dict[str, Any]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _kind(f: dataclasses.Field) -> str:
    """The first type of a field's annotation, as written (``"int"`` for ``int | None``)."""
    return str(f.type).split("|")[0].strip()


def _check_range(owner: str, f: dataclasses.Field, value: Any) -> None:
    """Raise ``EditError`` when a numeric hyper-parameter holds text or lies outside its name's range."""
    numeric = _kind(f) in ("int", "float")
    if numeric and isinstance(value, str):
        raise EditError(f"{owner} hyper-parameter {f.name} must be a number, not {value!r}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if f.name in AT_LEAST_ONE and value < 1:
        raise EditError(f"{owner} hyper-parameter {f.name} must be at least 1, not {value}")
    if f.name in POSITIVE and not value > 0:
        raise EditError(f"{owner} hyper-parameter {f.name} must be positive, not {value}")
    if f.name in NON_NEGATIVE and value < 0:
        raise EditError(f"{owner} hyper-parameter {f.name} must be non-negative, not {value}")


class Method:
    """An editing method. Subclasses set ``name``, ``HParams`` and implement ``touched`` and ``compute``."""

    name: ClassVar[str]
    HParams: ClassVar[type[HParams]]

    def __init__(self, hparams: HParams | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        """``hparams``: this method's ``HParams`` (or a dict of its fields); ``overrides`` replace fields."""
        if isinstance(hparams, Mapping):
            overrides, hparams = {**hparams, **overrides}, None
        elif hparams is not None and not isinstance(hparams, self.HParams):
            raise EditError(f"{self.name} takes its hyper-parameters as {self.HParams.__name__} or a dict, "
                            f"not {type(hparams).__name__}")
        fields = {f.name for f in dataclasses.fields(self.HParams)}
        unknown = set(overrides) - fields
        if unknown:
            raise EditError(f"{self.name} has no hyper-parameter {', '.join(sorted(unknown))}; accepted: "
                            f"{', '.join(sorted(fields))}")
        base = hparams or self.HParams()
        self.hparams = dataclasses.replace(base, **overrides)

    # ------------------------------------------------------------------------------ subclass API
    def touched(self, model: Any, hp: Any, requests: Sequence[EditRequest]) -> list[str]:
        """Names of the parameters ``compute`` modifies in place (snapshotted and restored).

        Methods that never write to the model's weights (they train separate deltas) return ``[]``.
        """
        return []

    def compute(self, model: Any, hp: Any, requests: Sequence[EditRequest],
                originals: dict[str, torch.Tensor]) -> tuple[list[Component], dict[str, Any]]:
        """Compute the patch components and a dict of measurements (losses, steps).

        May modify the ``touched`` parameters in place; ``originals`` holds their values before.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------------------ entry point
    def edit(self, model: Any, requests: EditRequest | Sequence[EditRequest]) -> Patch:
        """Compute a ``Patch`` implementing ``requests`` on ``model``; the model is left unchanged."""
        model = require_model(model, EditError)
        requests = as_requests(requests)
        hp = self.hparams.resolve(model)
        start = time.perf_counter()
        try:
            with weight_transaction(model, self.touched(model, hp, requests)) as originals:
                components, info = self.compute(model, hp, requests, originals)
        except LmeditError:
            raise
        except (RuntimeError, ValueError, IndexError) as e:
            raise EditError(f"{self.name} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            "the model's weights are unchanged") from e
        info = {"model": model.name, "seconds": round(time.perf_counter() - start, 3), **info}
        return Patch(self.name, hp.to_dict(), list(requests), model.fingerprint, components, info)


class Stopwatch:
    """Accumulated wall time per phase of an edit, reported in ``patch.info["timing"]``.

        watch = Stopwatch()
        with watch("keys"):
            ...
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def report(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


@contextmanager
def weight_transaction(model: Any, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Freeze every parameter, snapshot ``names``, and restore them bit for bit on exit.

    Yields the snapshot (name → original tensor), which methods use to compute their deltas.
    ``requires_grad`` flags and train/eval mode are restored too.
    """
    params = list(model.module.named_parameters())
    flags = [(p, p.requires_grad) for _, p in params]
    was_training = model.module.training
    originals = {n: model.parameter(n).detach().clone() for n in dict.fromkeys(names)}
    for p, _ in flags:
        p.requires_grad_(False)
    model.module.eval()
    try:
        yield originals
    finally:
        with torch.no_grad():
            for n, original in originals.items():
                model.parameter(n).copy_(original)
        for p, flag in flags:
            p.requires_grad_(flag)
        model.module.train(was_training)
