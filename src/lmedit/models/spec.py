"""``ModelSpec``: where the parts of a causal LM live, found from its module tree.

Nothing here looks at the model's *name*. The decoder blocks are the longest ``nn.ModuleList`` of
identical modules; inside the first block, projections are recognised by their shapes (an MLP output
projection maps ``d_mlp → d_model``, its input projections ``d_model → d_mlp`` or ``2·d_mlp`` when
gate and up are fused) and, only to break ties between equally shaped candidates, by common names
(``o_proj``, ``out_proj``, ``dense`` …). Embeddings come from the Hugging Face accessors
``get_input_embeddings`` / ``get_output_embeddings``. Every entry can be overridden by the user.

Paths of per-block parts are stored *relative to a block* (e.g. ``"mlp.down_proj"``);
``spec.path(layer, "mlp_out")`` gives the absolute module path.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lmedit.errors import SpecError

# Roles whose paths are relative to a block.
BLOCK_ROLES = ("attn", "attn_out", "mlp", "mlp_out")
_ATTN_NAME = re.compile(r"(^|\.)(self_)?(attn|attention|self_attention)$")
_OUT_PROJ_NAME = re.compile(r"(^|\.)(o_proj|out_proj|c_proj|dense|wo|o|out)$")
_POST_MLP_NORM_NAME = re.compile(r"(^|\.)post_(feedforward|mlp|ffn)\w*norm\w*$")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: a linear layer whose weight is stored as ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or GPT-2 ``Conv1D``."""
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    return int(module.in_features), int(module.out_features)


@dataclass(frozen=True)
class ModelSpec:
    """The structure of a decoder-only transformer, as module paths and sizes.

    Attributes:
        blocks: path of the ``ModuleList`` of decoder blocks (e.g. ``"model.layers"``).
        n_layers: number of blocks.
        hidden_size: residual-stream width ``d_model``.
        mlp_size: MLP hidden width ``d_mlp`` (input width of the MLP output projection).
        attn: attention module, relative to a block (e.g. ``"self_attn"``).
        attn_out: attention output projection, relative to a block (e.g. ``"self_attn.o_proj"``).
        mlp: MLP module relative to a block, or ``None`` when its projections sit directly in the
            block (OPT).
        mlp_in: MLP input projection(s), relative to a block (gate and up for gated MLPs).
        mlp_out: MLP output projection ``W_out``, relative to a block (e.g. ``"mlp.down_proj"``).
        weight_layout: ``"out_in"`` for ``nn.Linear`` (weight ``[out, in]``), ``"in_out"`` for
            GPT-2's ``Conv1D`` (weight ``[in, out]``).
        embed: token embedding module. unembed: output projection to the vocabulary.
        final_norm: the norm applied after the last block (``None`` if the model has none).
        tied_embeddings: whether ``unembed`` shares its weight with ``embed``.
        mlp_post_norm: a norm applied to the MLP's output before it joins the residual stream, relative
            to a block (Gemma-2/3's and OLMo-2's ``post_feedforward_layernorm``), or ``None``.
    """

    blocks: str
    n_layers: int
    hidden_size: int
    mlp_size: int
    attn: str
    attn_out: str
    mlp: str | None
    mlp_in: tuple[str, ...]
    mlp_out: str
    weight_layout: str
    embed: str
    unembed: str
    final_norm: str | None
    tied_embeddings: bool
    mlp_post_norm: str | None = None
    overridden: tuple[str, ...] = field(default=())

    # ----------------------------------------------------------------------------------- paths
    def block(self, layer: int) -> str:
        """Absolute path of decoder block ``layer`` (negative indices count from the end)."""
        return f"{self.blocks}.{self._layer(layer)}"

    def path(self, layer: int, role: str) -> str:
        """Absolute path of a per-block part: ``role`` in ``attn, attn_out, mlp, mlp_out, block``."""
        if role == "block":
            return self.block(layer)
        if role not in BLOCK_ROLES:
            raise SpecError(f"unknown block role {role!r}; expected one of block, {', '.join(BLOCK_ROLES)}")
        rel = getattr(self, role)
        if rel is None:
            raise SpecError(f"this model has no separate {role!r} module (its projections sit in the block)")
        return f"{self.block(layer)}.{rel}"

    def _layer(self, layer: int) -> int:
        if not -self.n_layers <= layer < self.n_layers:
            raise SpecError(f"layer {layer} is out of range: the model has {self.n_layers} layers (0..{self.n_layers - 1})")
        return layer % self.n_layers

    def layer_at(self, fraction: float) -> int:
        """The layer at a depth fraction of the stack, e.g. ``0.66`` → layer 19 of 30."""
        return min(self.n_layers - 1, max(0, int(round(fraction * (self.n_layers - 1)))))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mlp_in"] = list(self.mlp_in)
        d["overridden"] = list(self.overridden)
        return d


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path, with a clear error if it does not exist."""
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        raise SpecError(f"the model has no module {path!r}") from None


MEASURED = {"n_layers", "hidden_size", "mlp_size", "weight_layout", "tied_embeddings", "overridden"}


def discover_spec(model: nn.Module, **overrides: Any) -> ModelSpec:
    """Find the ``ModelSpec`` of a Hugging Face causal LM from its module tree.

    Keyword overrides replace discovered entries (e.g. ``mlp_out="mlp.c_proj"``); they are
    validated against the model.
    """
    names = {id(m): n for n, m in model.named_modules()}
    blocks_path = overrides.get("blocks") or _find_blocks(model)
    blocks = get_module(model, blocks_path)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise SpecError(f"{blocks_path!r} is not a non-empty ModuleList of decoder blocks")
    block0 = blocks[0]

    embed_mod = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed_mod is None or id(embed_mod) not in names:
        raise SpecError("cannot find the token embedding (model.get_input_embeddings() returned nothing)")
    hidden = int(embed_mod.weight.shape[1])
    unembed_mod = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembed_mod is None or id(unembed_mod) not in names:
        raise SpecError("cannot find the unembedding (model.get_output_embeddings() returned nothing); is this a causal LM?")

    attn = overrides.get("attn") or _find_attention(block0)
    linears = {n: m for n, m in block0.named_modules() if n and is_linear_like(m)}
    in_attn = {n: m for n, m in linears.items() if n == attn or n.startswith(attn + ".")}
    outside = {n: m for n, m in linears.items() if n not in in_attn}

    attn_out = overrides.get("attn_out") or _pick(
        [n for n, m in in_attn.items() if linear_dims(m)[1] == hidden], "attention output projection", block0
    )
    mlp_out = overrides.get("mlp_out") or _pick(
        [n for n, m in outside.items() if linear_dims(m)[1] == hidden and linear_dims(m)[0] != hidden]
        or [n for n, m in outside.items() if linear_dims(m)[1] == hidden],
        "MLP output projection",
        block0,
        prefer_largest_in=True,
    )
    mlp_out_mod = get_module(block0, mlp_out)
    if not is_linear_like(mlp_out_mod):
        raise SpecError(f"mlp_out {mlp_out!r} is a {type(mlp_out_mod).__name__}, not a linear layer")
    mlp_size = linear_dims(mlp_out_mod)[0]
    mlp = overrides["mlp"] if "mlp" in overrides else (mlp_out.rpartition(".")[0] or None)
    mlp_in = tuple(overrides.get("mlp_in") or [
        n for n, m in outside.items() if linear_dims(m)[0] == hidden and linear_dims(m)[1] in (mlp_size, 2 * mlp_size)
    ])
    mlp_post_norm = overrides["mlp_post_norm"] if "mlp_post_norm" in overrides else next(
        (n for n, m in block0.named_modules() if _POST_MLP_NORM_NAME.search(n) and not any(True for _ in m.children())),
        None)
    for rel in (attn, attn_out, *mlp_in) + ((mlp,) if mlp else ()) + ((mlp_post_norm,) if mlp_post_norm else ()):
        get_module(block0, rel)

    spec = ModelSpec(
        blocks=blocks_path,
        n_layers=len(blocks),
        hidden_size=hidden,
        mlp_size=mlp_size,
        attn=attn,
        attn_out=attn_out,
        mlp=mlp,
        mlp_in=mlp_in,
        mlp_out=mlp_out,
        weight_layout="in_out" if is_conv1d(mlp_out_mod) else "out_in",
        embed=overrides.get("embed") or names[id(embed_mod)],
        unembed=overrides.get("unembed") or names[id(unembed_mod)],
        final_norm=overrides["final_norm"] if "final_norm" in overrides else _find_final_norm(model, blocks_path),
        tied_embeddings=unembed_mod.weight is embed_mod.weight
        or unembed_mod.weight.data_ptr() == embed_mod.weight.data_ptr(),
        mlp_post_norm=mlp_post_norm,
    )
    unknown = set(overrides) - set(ModelSpec.__dataclass_fields__)
    if unknown:
        raise SpecError(f"unknown ModelSpec entries {sorted(unknown)}; accepted: {', '.join(ModelSpec.__dataclass_fields__)}")
    for key in sorted(set(overrides) & MEASURED):
        if overrides[key] != getattr(spec, key):
            raise SpecError(f"{key} is measured from the modules ({getattr(spec, key)!r}), not set: override the module "
                            f"paths instead (blocks, attn, attn_out, mlp, mlp_in, mlp_out, mlp_post_norm, embed, unembed, "
                            f"final_norm)")
    for key in ("embed", "unembed", "final_norm"):
        value = getattr(spec, key)
        if value is not None:
            get_module(model, value)
    return replace(spec, overridden=tuple(sorted(overrides)))


def _find_blocks(model: nn.Module) -> str:
    """The longest ModuleList whose children share one class and contain linear layers."""
    best: tuple[int, int, str] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not any(is_linear_like(m) for m in module[0].modules()):
            continue
        key = (len(module), -name.count("."), name)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None:
        raise SpecError(
            f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList of identical blocks with linear "
            "layers; pass blocks='path.to.layers'"
        )
    return best[2]


def _find_attention(block: nn.Module) -> str:
    candidates = [n for n, m in block.named_modules() if n and _ATTN_NAME.search(n) and
                  any(is_linear_like(c) for c in m.modules())]
    if not candidates:
        raise SpecError(f"cannot find the attention module in {type(block).__name__}; pass attn='...'")
    return min(candidates, key=lambda n: (n.count("."), n))


def _pick(candidates: list[str], what: str, block: nn.Module, prefer_largest_in: bool = False) -> str:
    if not candidates:
        raise SpecError(f"cannot find the {what} in {type(block).__name__}; pass it as an override")
    if len(candidates) == 1:
        return candidates[0]
    if prefer_largest_in:
        widest = max(linear_dims(block.get_submodule(n))[0] for n in candidates)
        candidates = [n for n in candidates if linear_dims(block.get_submodule(n))[0] == widest]
    named = [n for n in candidates if _OUT_PROJ_NAME.search(n)]
    return (named or candidates)[-1]


def _find_final_norm(model: nn.Module, blocks_path: str) -> str | None:
    """The last norm module registered outside the blocks (``model.norm``, ``transformer.ln_f`` …)."""
    found = None
    for name, module in model.named_modules():
        if name == blocks_path or name.startswith(blocks_path + "."):
            continue
        if "norm" in type(module).__name__.lower() and not any(True for _ in module.children()):
            found = name
    return found


def mlp_out_weight(model: nn.Module, spec: ModelSpec, layer: int) -> torch.Tensor:
    """``W_out`` of a layer as a ``[d_model, d_mlp]`` view, whatever its storage orientation."""
    weight = get_module(model, spec.path(layer, "mlp_out")).weight
    return weight.T if spec.weight_layout == "in_out" else weight
