"""WISE's side memories: the structure that lives beside one ``W_out`` and answers at inference.

A side memory is ``W′ = W + τ`` on the output projection of one layer; only ``τ`` is stored (float32,
``nn.Linear`` layout ``[d_model, d_mlp]`` for every architecture), so the main memory ``W`` may itself
be edited by other methods. For an input ``x`` with keys ``a_t`` (the inputs of ``W_out`` at its
tokens), the **routing activation** of a memory is

    Δ_act(x) = mean_t ‖τ a_t‖₂ = mean_t ‖(W′ − W) a_t‖₂

over the input's tokens (padding and the document-start token excluded). The side memory answers if
some memory has ``Δ_act ≥ ε = act_ratio · min_act`` (``min_act``: the smallest activation of its own
edits' prompts); one memory then answers (see "Retrieval"), replacing the layer output by ``W′ a``;
if none fires, the main memory ``W`` answers unchanged. The decision is taken on the prompt and held for
the tokens generated after it (KV-cached decoding).

**Retrieval (lmedit's changes).** The paper retrieves the memory with the largest raw ``Δ_act``. Shards
differ in scale — on SmolLM2 a later dense shard fires at 119–175 on an earlier shard's prompts, which
that shard answers at 127–200 — so raw activations misroute; measured in units of each memory's own
threshold they do not as often (100 sequential ZsRE edits in shards of 49: edit prompts answered by
their own memory 81 → 92 of 100, rephrasings 78 → 91; unrelated questions routed in: 0 either way).
Activations still separate memories poorly once there are many: dense shards trained only against
unrelated text fire on each other's prompts almost as much as on their own (280 edits in 6 memories:
own prompts 74 ± 8, other memories' prompts 61 ± 8), and 46 of 280 edit prompts and 55 of 280
rephrasings (teacher-forced, target included) went to another memory. So a memory may also carry
**anchors**: the unit-length mean key ``ā = Σ_t w_t a_t / Σ_t w_t`` of each of its edits' prompts (the
tokens ``Δ_act`` counts). The gate stays WISE's — the side memory answers only if some memory's
``Δ_act ≥ ε`` — but *which* memory answers is then the one holding the anchor nearest the input's own
mean key by cosine (``max_j ā_j · ā(x) / ‖ā(x)‖``). On those 280 edits: 280 of 280 prompts and 270 of
280 rephrasings to their own memory, unrelated questions routed in unchanged (0). Memories without
anchors (patches from before, or WISE's ``retrieve_by="activation"``) are chosen by relative activation.

**Whitened keys (session 51).** Mean keys share most of their direction (on Gemma-3-270M the last-token
keys of ZsRE prompts have mean cosine 0.91), so a plain cosine is dominated by what all prompts have in
common and by the directions in which prompts vary most — wording, length — rather than by what tells
one edit's prompt from another's. ``key_metric="whitened"`` (the default) compares keys after whitening
by the anchors' own statistics: with μ and C the mean and covariance of all anchors and
``L Lᵀ = C + λ I`` (λ = 0.1 × C's mean eigenvalue, a ridge: there are fewer anchors than dimensions),
an anchor or a query ``k`` becomes ``ŵ(k) = L⁻¹ (k − μ) / ‖L⁻¹ (k − μ)‖`` and the memory holding the
anchor with the largest ``ŵ(ā_j) · ŵ(ā(x))`` answers (nearest by Mahalanobis direction). Only the choice
among memories changes; the gate does not. On the runs' final states, bare first rephrasings routed as
inference routes them (``benchmarks/wise_threshold.py --key-metric whitened``; 0.88 × min_act): Gemma-3,
1,000 ZsRE edits in 40 memories, 947 of 1,000 to the memory holding their edit (810 with the cosine);
SmolLM2, 160 shuffled ZsRE edits in 4 memories, 152 of 160; 75 temporal passages in 2 memories, 59 of 75.
By the nearest stored key alone, gate aside (a one-off script, session 51): 810 → 948, 149 → 154, 50 → 59,
and λ from 0.03 to 1.0 × the mean eigenvalue gives 944–950 on Gemma-3 (0.01: 941).
``key_metric="cosine"`` keeps the plain cosine.

``measured_routing`` sets a memory's ``min_act`` (and anchors) from its edits' prompts as inference routes them.
``SideMemoryEdit`` is the patch component: the memories an edit replaced and the ones it wrote
(dense ``τ`` before/after), so WISE edits save, load and revert exactly like weight edits.
``ties_merge`` merges shards. Training lives in ``lmedit.methods.wise``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Sequence

import torch

from lmedit.adaptors import Adaptor, adaptors, get_or_attach
from lmedit.errors import PatchError
from lmedit.hooks import read_module
from lmedit.patch import COMPONENTS, Component
from lmedit.scoring import encode


@dataclass(eq=False)
class Memory:
    """One side memory ``W + τ``: a shard (open while ``mask`` is set) or a merge of shards."""

    id: str
    serial: int  # creation order (memories are kept sorted by it)
    delta: torch.Tensor  # τ, float32, [d_model, d_mlp], on the CPU
    mask: torch.Tensor | None  # bool [d_model, d_mlp]: the entries this open shard may train
    edits: int
    min_act: float  # smallest Δ_act of its edits' prompts
    act_ratio: float
    shards: int = 1
    merged: bool = False
    version: int = 0
    anchors: torch.Tensor | None = None  # float32 [edits, d_mlp]: unit mean keys of its edits' prompts
    prompts: list[str] = field(default_factory=list)  # its edits' prompts (replayed when training later shards)
    targets: list[str] = field(default_factory=list)  # their targets (rehearsed while the shard is open)

    @property
    def threshold(self) -> float:
        return self.act_ratio * self.min_act

    def meta(self) -> dict[str, Any]:
        return {"id": self.id, "serial": self.serial, "edits": self.edits, "min_act": self.min_act,
                "act_ratio": self.act_ratio, "shards": self.shards, "merged": self.merged, "version": self.version,
                "has_mask": self.mask is not None,
                "has_anchors": self.anchors is not None, "prompts": list(self.prompts),
                "targets": list(self.targets)}


def token_weights(attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device,
                  prefill: bool = True) -> torch.Tensor:
    """``[B, T]`` float weights of the tokens that count for Δ_act: not padding, not the first token.

    The first (document-start / BOS) token is excluded because its key is the same for every input
    (it would add the same activation to edit and unrelated inputs alike).
    """
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[0] != batch:
        m = torch.ones(batch, length, device=device)
        if prefill and length > 1:
            m[:, 0] = 0
        return m
    m = attention_mask[:, -length:].to(device=device, dtype=torch.float32)
    if prefill:
        m = m * (m.cumsum(1) != 1)
    return m


def routing_activation(x: torch.Tensor, delta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Δ_act`` per row: ``Σ_t w_t ‖τ a_t‖ / Σ_t w_t`` for keys ``x`` ``[B, T, d_mlp]`` and ``τ`` ``[d_model, d_mlp]``."""
    norms = torch.linalg.vector_norm(x.to(delta.dtype) @ delta.T, dim=-1)
    return (norms * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def measured_routing(model: Any, path: str, memory: Memory, anchors: bool = True) -> Memory:
    """``memory`` with ``min_act = min_j Δ_act(x_j)`` over its edits' bare prompts under its ``τ`` as it is
    now, computed exactly as inference routes them (``routing_activation`` on ``prompt_keys``), and, with
    ``anchors``, the unit mean key of each prompt (``mean_keys``; ``None`` otherwise).

    The paper keeps the smallest in-scope activation each edit reached *when it was trained*. Both later
    training and merging move those activations: after 131 sequential ZsRE edits on SmolLM2 the recorded
    minimum was 109 but every edit prompt's activation was ≥ 127, so the threshold (× 0.88) let 33 of
    131 unrelated test questions into the memory where the measured one lets 2 (all edits and
    rephrasings still routed in); two dense shards of 25 edits merged routed 23 of 50 in (Loc. 0.74 → 1.00).
    """
    if not memory.prompts:
        return replace(memory, anchors=None)
    keys = prompt_keys(model, path, memory.prompts)
    padded = torch.nn.utils.rnn.pad_sequence(keys, batch_first=True).float()
    weights = torch.nn.utils.rnn.pad_sequence([torch.ones(len(k), device=model.device) for k in keys], batch_first=True)
    acts = routing_activation(padded, memory.delta.to(model.device), weights)
    return replace(memory, min_act=float(acts.min()), anchors=mean_keys(padded, weights).cpu() if anchors else None)


def mean_keys(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Unit-length weighted mean key per row, ``ā / ‖ā‖`` with ``ā = Σ_t w_t a_t / Σ_t w_t``
    (float32 ``[B, d_mlp]``)."""
    mean = (x.float() * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)
    return torch.nn.functional.normalize(mean, dim=-1)


def prompt_keys(model: Any, path: str, prompts: Sequence[str], batch_size: int = 64) -> list[torch.Tensor]:
    """``W_out``'s inputs at each bare prompt's routing tokens (``[n_tokens, d_mlp]``, bfloat16 on the CPU
    to keep 1,000 prompts in ~37 MB), cached on the model while nothing below the side memory changes:
    the cache key holds every parameter's in-place version counter and the adaptors on other modules."""
    state = (tuple(p._version for p in model.module.parameters()),
             tuple(sorted((where, id(a)) for where, a in adaptors(model).items() if where != path)))
    cached = model.cache.get(("wise_prompt_keys", path))
    if cached is None or cached[0] != state:
        cached = model.cache[("wise_prompt_keys", path)] = (state, {})
    store: dict[str, torch.Tensor] = cached[1]
    missing = [p for p in dict.fromkeys(prompts) if p not in store]
    with torch.no_grad():
        for i in range(0, len(missing), batch_size):
            chunk = missing[i: i + batch_size]
            batch = encode(model, chunk)
            keys = read_module(model, batch, path)
            weights = token_weights(batch.attention_mask, *batch.input_ids.shape, model.device)
            for b, prompt in enumerate(chunk):
                store[prompt] = keys[b, weights[b] > 0].to(device="cpu", dtype=torch.bfloat16)
    return [store[p].to(model.device) for p in prompts]


class SideMemory(Adaptor):
    """WISE's side memories on one ``W_out`` module (see the module docstring)."""

    transient = ("_handle", "_root_handle", "_attention", "last_route", "_on_device", "last_activations")
    key_metric: str = "whitened"  # how the nearest anchor is found: "whitened" or "cosine" (module docstring)

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.memories: list[Memory] = []
        self.enabled = True
        self._root_handle: Any = None
        self._attention: torch.Tensor | None = None
        self.last_route: torch.Tensor | None = None  # [B] memory that answered each row of the last prompt (-1: main)
        self._on_device: dict[tuple[str, int, str], torch.Tensor] | None = None
        self.last_activations: torch.Tensor | None = None  # [memories, B] Δ_act of the last routed prompt

    # -------------------------------------------------------------------------------- attachment
    def attach(self, model: Any) -> None:
        super().attach(model)

        def capture(_m: Any, _args: tuple, kwargs: dict) -> None:
            self._attention = kwargs.get("attention_mask")

        self._root_handle = model.module.register_forward_pre_hook(capture, with_kwargs=True)

    def detach(self) -> None:
        super().detach()
        if self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None

    def is_empty(self) -> bool:
        return not self.memories

    def as_component(self) -> "SideMemoryEdit":
        return SideMemoryEdit(self.path, [], [copy_memory(m) for m in self.memories])

    # -------------------------------------------------------------------------------- inference
    def _on(self, memory: Memory, name: str, device: torch.device) -> torch.Tensor:
        """``memory.delta`` or ``memory.anchors`` on ``device``, kept there while the memory's version lasts."""
        cache = self._on_device if self._on_device is not None else {}
        key = (memory.id, memory.version, str(device), name)
        if key not in cache:
            cache = {k: v for k, v in cache.items() if k[0] != memory.id or k[1] == memory.version}
            cache[key] = getattr(memory, name).to(device)
        self._on_device = cache
        return cache[key]

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the answering memory per row of ``x`` ``[B, T, d_mlp]`` (``-1``: the main memory): none
        unless some memory's ``Δ_act ≥ ε``; then the one with the nearest anchor if all memories carry
        anchors, else the one with the largest ``Δ_act / ε`` among those over their threshold."""
        batch, length = x.shape[:2]
        mask = self._attention
        cached = mask is not None and mask.dim() == 2 and mask.shape[1] > length  # a continuation of a prefix
        if cached and self.last_route is not None and self.last_route.shape[0] == batch:
            return self.last_route
        weights = token_weights(mask, batch, length, x.device, prefill=not cached)
        acts = torch.stack([routing_activation(x, self._on(m, "delta", x.device), weights) for m in self.memories])
        self.last_activations = acts
        thresholds = torch.tensor([m.threshold for m in self.memories], device=x.device)[:, None]
        fired = acts >= thresholds
        if len(self.memories) > 1 and all(m.anchors is not None for m in self.memories):
            index = self._nearest_memory(mean_keys(x, weights))
        else:
            relative = torch.where(fired, acts / thresholds.clamp(min=1e-12), torch.full_like(acts, -1.0))
            index = relative.argmax(0)
        self.last_route = torch.where(fired.any(0), index, torch.full_like(index, -1))
        return self.last_route

    def forget_route(self) -> None:
        """Route the next forward pass afresh (a continuation of a prompt otherwise reuses ``last_route``)."""
        self.last_route = None

    def _nearest_memory(self, query: torch.Tensor) -> torch.Tensor:
        """Per row of ``query`` (unit mean keys ``[B, d_mlp]``), the index of the memory holding the nearest
        anchor: by whitened cosine (``key_metric="whitened"``) or plain cosine."""
        if self.key_metric == "cosine":
            score = torch.stack([(self._on(m, "anchors", query.device) @ query.T).amax(0) for m in self.memories])
            return score.argmax(0)
        if self.key_metric != "whitened":
            raise PatchError(f"unknown key_metric {self.key_metric!r}; accepted: 'whitened', 'cosine'")
        # keyed by the memories' ids and versions, not kept on the adaptor: a patch applied and reverted per
        # request (the HTTP service, benchmarks/memory_latency.py) attaches a new adaptor each time
        key = (tuple((m.id, m.version) for m in self.memories), str(query.device))
        if key not in _WHITENED:
            anchors = [m.anchors for m in self.memories]  # type: ignore[misc]
            owner = torch.cat([torch.full((len(a),), j) for j, a in enumerate(anchors)])
            if len(_WHITENED) >= 4:
                _WHITENED.pop(next(iter(_WHITENED)))
            _WHITENED[key] = tuple(t.to(query.device) for t in (*whitening(torch.cat(anchors)), owner))
        mu, chol, white, owner = _WHITENED[key]
        return owner[(white @ whiten(query.float(), mu, chol).T).argmax(0)]

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled or not self.memories:
            return None
        route = self.route(x)
        if bool((route < 0).all()):
            return None
        new = out.clone()
        for i in route.unique().tolist():
            if i < 0:
                continue
            rows = route == i
            delta = self._on(self.memories[i], "delta", x.device)
            new[rows] = out[rows] + (x[rows].to(delta.dtype) @ delta.T).to(out.dtype)
        return new

    # -------------------------------------------------------------------------------- state changes
    def replace_memories(self, remove: Sequence[Memory], add: Sequence[Memory]) -> None:
        """Remove ``remove`` (which must be present at their versions) and insert ``add``."""
        current = {m.id: m for m in self.memories}
        for m in remove:
            if m.id not in current or current[m.id].version != m.version:
                raise PatchError(f"this WISE patch expects side memory {m.id} (version {m.version}) on {self.path}; "
                                 "apply (or revert) the WISE patches in order")
        gone = {m.id for m in remove}
        for m in add:
            if m.id in current and m.id not in gone:
                raise PatchError(f"side memory {m.id} is already on {self.path}")
        kept = [m for m in self.memories if m.id not in gone]
        self.memories = sorted(kept + [copy_memory(m) for m in add], key=lambda m: m.serial)
        self.forget_route()


_WHITENED: dict[tuple[Any, ...], tuple[torch.Tensor, ...]] = {}
"""``whitening`` of the last few sets of memories, by (memory ids and versions, device): (μ, L, ŵ(anchors), owner)."""


def whitening(anchors: torch.Tensor, ridge: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(μ, L, ŵ(anchors))`` for keys ``anchors`` ``[N, d]``: their mean, the Cholesky factor of
    ``C + λ I`` (C their covariance, λ = ``ridge`` × C's mean eigenvalue), and the anchors whitened
    (``whiten``). Computed in float64; returned as float32."""
    a = anchors.double()
    mu = a.mean(0)
    centred = a - mu
    cov = centred.T @ centred / max(1, len(a) - 1)
    lam = max(ridge * float(cov.diagonal().mean()), 1e-12)
    chol = torch.linalg.cholesky(cov + lam * torch.eye(len(mu), dtype=cov.dtype))
    return mu.float(), chol.float(), whiten(a, mu, chol).float()


def whiten(keys: torch.Tensor, mu: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``ŵ(k) = L⁻¹ (k − μ) / ‖L⁻¹ (k − μ)‖`` per row of ``keys`` ``[B, d]``."""
    solved = torch.linalg.solve_triangular(chol, (keys - mu).T, upper=False).T
    return torch.nn.functional.normalize(solved, dim=-1)


def copy_memory(m: Memory) -> Memory:
    return replace(m, delta=m.delta.clone(), mask=None if m.mask is None else m.mask.clone(),
                   anchors=None if m.anchors is None else m.anchors.clone())


@dataclass(eq=False)
class SideMemoryEdit(Component):
    """Replace side memories ``before`` by ``after`` on one module (exactly reversible)."""

    kind: ClassVar[str] = "side_memory_edit"
    memory: ClassVar[bool] = True
    path: str
    before: list[Memory]
    after: list[Memory]

    def apply(self, model: Any) -> None:
        get_or_attach(model, self.path, SideMemory).replace_memories(self.before, self.after)

    def revert(self, model: Any) -> None:
        side = adaptors(model).get(self.path)
        if not isinstance(side, SideMemory):
            raise PatchError(f"no WISE side memory on {self.path} to revert")
        side.replace_memories(self.after, self.before)
        if side.is_empty():
            adaptors(model).pop(self.path).detach()

    def commit(self) -> None:
        self.before = []

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for side, memories in (("before", self.before), ("after", self.after)):
            for i, m in enumerate(memories):
                out[f"{side}.{i}.delta"] = m.delta
                if m.mask is not None:
                    out[f"{side}.{i}.mask"] = m.mask
                if m.anchors is not None:
                    out[f"{side}.{i}.anchors"] = m.anchors
        return out

    def manifest(self) -> dict[str, Any]:
        return {"path": self.path, "before": [m.meta() for m in self.before], "after": [m.meta() for m in self.after]}

    @classmethod
    def restore(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "SideMemoryEdit":
        def load(side: str) -> list[Memory]:
            out = []
            for i, meta in enumerate(manifest[side]):
                meta = dict(meta)
                has_mask, has_anchors = meta.pop("has_mask"), meta.pop("has_anchors", False)  # older patches: none
                out.append(Memory(delta=tensors[f"{side}.{i}.delta"],
                                  mask=tensors[f"{side}.{i}.mask"].bool() if has_mask else None,
                                  anchors=tensors[f"{side}.{i}.anchors"] if has_anchors else None, **meta))
            return out

        return cls(manifest["path"], load("before"), load("after"))


COMPONENTS[SideMemoryEdit.kind] = SideMemoryEdit


def ties_merge(deltas: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """TIES merging (Yadav et al. 2023) of task vectors ``τ_i``: trim, elect sign, disjoint mean.

    Each ``τ_i`` keeps its ``density`` fraction of largest-magnitude entries; an entry's sign is that of
    ``Σ_i τ_i`` (trimmed); the merged entry is the mean of the entries whose sign agrees with it.
    """
    trimmed = []
    for d in deltas:
        k = max(1, int(round(density * d.numel())))
        flat = d.abs().flatten()
        cut = flat.kthvalue(flat.numel() - k + 1).values if k < flat.numel() else flat.min()
        trimmed.append(torch.where(d.abs() >= cut, d, torch.zeros_like(d)))
    stack = torch.stack(trimmed)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(stack) == sign).float()
    return (stack * agree).sum(0) / agree.sum(0).clamp(min=1.0)
