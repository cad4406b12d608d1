"""One hook utility for every method, metric, tracer and steerer.

``Hooks`` is a context manager that reads, replaces or adds to the *main tensor* of a module's input
or output during forward passes, and always removes its hooks on exit (also on exceptions).
The main tensor is the first positional argument for inputs, and the output itself or its first
element when a module returns a tuple (as many Hugging Face blocks do); the rest of a tuple passes
through unchanged, so callers never deal with each architecture's return conventions.

    with Hooks(model) as h:
        h.read("model.layers.5.mlp.down_proj", "input", key="k")           # h["k"]: the keys
        h.add("model.layers.5", "output", delta)                           # residual += delta
        h.replace("model.layers.7.mlp", "output", lambda out: out * 0)     # any function
        model(**batch)

``ReplayBelow`` runs the blocks below a layer once and replays their outputs on later passes over
the same batch: the standard trick for optimisation-based editors that only train parameters (or a
delta) at or above that layer.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, Literal

import torch
from torch import nn

from lmedit.models.spec import get_module, is_conv1d

Where = Literal["input", "output"]
Edit = Callable[[torch.Tensor], torch.Tensor | None]


def _main(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _with_main(value: Any, main: torch.Tensor) -> Any:
    if isinstance(value, tuple):
        return (main, *value[1:])
    if isinstance(value, list):
        return [main, *value[1:]]
    return main


class _StopForward(Exception):
    """Raised by ``Hooks.forward_until`` to end a forward pass early."""


class Hooks(AbstractContextManager):
    """A set of forward hooks on a model, removed together when the context exits.

    Args:
        root: the module that paths are relative to (usually the Hugging Face model).
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.values: dict[str, torch.Tensor | list[torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # ---------------------------------------------------------------------------- public API
    def read(self, path: str | nn.Module, where: Where = "output", *, key: str | None = None,
             detach: bool = True, accumulate: bool = False) -> str:
        """Record the main tensor at ``path``'s input or output into ``self[key]``.

        With ``accumulate`` each forward pass appends to a list instead of overwriting.
        Returns the key (default: ``"<path>:<where>"``).
        """
        key = key or f"{self._name(path)}:{where}"

        def record(t: torch.Tensor) -> None:
            t = t.detach() if detach else t
            if accumulate:
                self.values.setdefault(key, []).append(t)  # type: ignore[union-attr]
            else:
                self.values[key] = t

        self._register(path, where, record)
        return key

    def replace(self, path: str | nn.Module, where: Where, fn: Edit) -> None:
        """Replace the main tensor at ``path``'s input or output by ``fn(tensor)`` (``None`` keeps it)."""
        self._register(path, where, fn)

    def add(self, path: str | nn.Module, where: Where, delta: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Add ``delta`` (broadcast; or ``delta(tensor)``) to the main tensor at ``path``'s input or output."""
        self._register(path, where, lambda t: t + (delta(t) if callable(delta) else delta.to(t.dtype)))

    def add_to_weight(self, path: str | nn.Module, delta: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        """Make a linear layer behave as if its weight were ``W + delta`` (``delta`` in ``W``'s layout).

        Adds ``x Δᵀ`` (``nn.Linear``, weight ``[out, in]``) or ``x Δ`` (GPT-2 ``Conv1D``, ``[in, out]``)
        to the output, computed in ``delta``'s dtype — so a float32 delta can be trained on a bf16 model.
        ``delta`` may be a function returning the current delta (e.g. a LoRA product ``B A``).
        """
        module = get_module(self.root, path) if isinstance(path, str) else path
        conv1d = is_conv1d(module)

        def hook(_m: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            d = delta() if callable(delta) else delta
            x = args[0].to(d.dtype)
            extra = x @ d if conv1d else x @ d.T
            return output + extra.to(output.dtype)

        self._handles.append(module.register_forward_hook(hook))

    def forward_until(self, path: str | nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Call ``fn(*args, **kwargs)`` (a forward pass) but stop it once ``path`` has produced its output.

        For callers that only read activations up to some depth: the layers above are never run.
        """
        module = get_module(self.root, path) if isinstance(path, str) else path

        def stop(*_: Any) -> None:
            raise _StopForward

        handle = module.register_forward_hook(stop)
        try:
            fn(*args, **kwargs)
        except _StopForward:
            pass
        finally:
            handle.remove()

    def __getitem__(self, key: str) -> Any:
        if key not in self.values:
            raise KeyError(f"nothing recorded under {key!r}; did the forward pass reach that module?")
        return self.values[key]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ---------------------------------------------------------------------------- internals
    def _name(self, path: str | nn.Module) -> str:
        if isinstance(path, str):
            return path
        for name, module in self.root.named_modules():
            if module is path:
                return name
        return type(path).__name__

    def _register(self, path: str | nn.Module, where: Where, fn: Callable[[torch.Tensor], Any]) -> None:
        module = get_module(self.root, path) if isinstance(path, str) else path
        if where == "output":
            def hook(_m: nn.Module, _args: Any, output: Any) -> Any:
                new = fn(_main(output))
                return None if new is None else _with_main(output, new)

            self._handles.append(module.register_forward_hook(hook))
        elif where == "input":
            def pre_hook(_m: nn.Module, args: Any, kwargs: dict) -> Any:
                if args:
                    new = fn(args[0])
                    return None if new is None else ((new, *args[1:]), kwargs)
                # Some blocks take hidden_states as a keyword argument.
                name = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                new = fn(kwargs[name])
                return None if new is None else (args, {**kwargs, name: new})

            self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            raise ValueError(f"where must be 'input' or 'output', not {where!r}")


class ReplayBelow(AbstractContextManager):
    """Run blocks ``0 .. layer-1`` once, then replay their recorded outputs on every later pass.

    Valid only while the batch fed to the model stays the same and nothing below ``layer`` changes
    (which holds when only parameters or deltas at or above ``layer`` are trained). Outputs are
    recorded detached, so no gradient flows below ``layer``.

    ``bound`` (default ``layer``) may be raised between passes, up to ``layer``: blocks from ``bound`` up
    run normally and are not recorded. Passes that change one layer after another, in ascending order,
    thus run each block below the changed one only once in all (knowledge-neuron attribution).
    """

    def __init__(self, blocks: nn.ModuleList, layer: int) -> None:
        self.blocks = blocks
        self.layer = layer
        self.bound = layer
        self._cache: dict[int, Any] = {}
        self._originals: dict[int, Callable] = {}

    def __enter__(self) -> "ReplayBelow":
        for i in range(self.layer):
            block = self.blocks[i]
            original = block.forward
            self._originals[i] = original

            def forward(*args: Any, _i: int = i, _orig: Callable = original, **kwargs: Any) -> Any:
                if _i >= self.bound:
                    return _orig(*args, **kwargs)
                if _i not in self._cache:
                    with torch.no_grad():
                        self._cache[_i] = _orig(*args, **kwargs)
                return self._cache[_i]

            block.forward = forward  # instance attribute shadows the class method
        return self

    def __exit__(self, *exc: object) -> None:
        for i in self._originals:
            del self.blocks[i].forward  # back to the class's forward
        self._originals.clear()
        self._cache.clear()


def read_module(model: Any, batch: Any, path: str, where: Where = "input") -> torch.Tensor:
    """The main tensor of module ``path``'s input or output over every token of ``batch`` (an
    ``lmedit.scoring.Batch``), ``[B, T, d]``, from one forward pass of ``model`` (an ``lmedit.Model``)
    stopped at ``path``: the layers above it never run. Gradients flow only if the caller enables them."""
    from lmedit.scoring import forward_logits

    with Hooks(model.module) as hooks:
        key = hooks.read(path, where)
        hooks.forward_until(path, forward_logits, model, batch, last=1)
        return hooks[key]
