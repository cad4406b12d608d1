"""WISE (Wang et al. 2024): a side memory beside one MLP's ``W_out``, routed by its own activation.

**Memories.** The side memory is ``W′ = W + τ`` on the output projection of one layer (the "value"
matrix: Llama-7B layer 27 of 32, ``down_proj``; the same depth fraction here). Only ``τ`` is stored
(float32, ``nn.Linear`` layout ``[d_model, d_mlp]`` for every architecture), so the main memory ``W``
may itself be edited by other methods. For an input ``x`` with keys ``a_t`` (the inputs of ``W_out`` at
its tokens), the **routing activation** of a memory is

    Δ_act(x) = mean_t ‖τ a_t‖₂ = mean_t ‖(W′ − W) a_t‖₂

over the input's tokens (padding and the document-start token excluded). At inference the memory
with the largest ``Δ_act`` answers if ``Δ_act ≥ ε = act_ratio · min_act`` (``min_act``: the smallest
activation its own edits reached in training), replacing the layer output by ``W′ a``; otherwise the
main memory ``W`` answers unchanged. The decision is taken on the prompt and held for the tokens
generated after it (KV-cached decoding).

**Editing** trains ``τ`` of the open shard with plain gradient descent (lr 1.0, up to 70 steps) on

    L = NLL(y | x_e) + mean relu(Δ_act(x_irr) − α) + mean relu(β − Δ_act(x_e))
        + mean relu(γ − (Δ_act(x_e) − Δ_act(x_irr)))

where ``x_e`` is the edit prompt with its target under
every context prefix (the model-written ``"{}"``-templates of ROME, 5 of 5 and 5 of 10 tokens) and
``x_irr`` are unrelated sentences (``n_irrelevant`` per edit, from the corpus: the benchmark data's
Wikipedia passages by default). The side memory is on for every row during training. After each
step ``τ``'s gradient is multiplied by the shard's random **mask** (a fraction ``mask_ratio`` = 0.2 of
its entries; the paper's knowledge sharding) and ``τ`` is clamped to ``|τ_ij| ≤ norm_constraint``.

**Margins.** The published α = 5, β = 20, γ = 10 were set for Llama-2-7B. On SmolLM2-135M the
ceiling α = 5 is out of reach (a trained side memory activates at 30–80 on unrelated sentences) and
its gradient fights the edit (one ZsRE edit: NLL 0.36, unrelated 34 vs in-scope 49 after 70 steps);
lmedit's defaults α = 20, β = 60, γ = 20 separate them (NLL 0.24, unrelated 17 vs in-scope 97).

**Sharding and merging.** A shard takes ``shard_size`` edits (500) and is then closed; the next edit
opens a new shard with a fresh mask. Every ``merge_every`` edits (1000) shards are merged TIES-style
(trim each ``τ_i`` to its largest ``density`` = 53 % entries by magnitude, elect each entry's sign by
the sign of ``Σ τ_i``, average the entries that agree with it): **WISE-Merge** (``mode="merge"``)
merges everything into one side memory; **WISE-Retrieve** (``mode="retrieve"``) merges only the
shards since the last merge, keeping earlier merged memories apart to be retrieved by activation.

Each edit's patch holds the memories it replaced and the ones it wrote (dense ``τ`` before/after),
so WISE edits save, load and revert exactly like weight edits. Replay of earlier shards' prompts
(the paper's appendix B.3) is not implemented.
"""
from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, Sequence

import torch

from lmedit.adaptors import Adaptor, adaptors, get_or_attach
from lmedit.errors import EditError, PatchError
from lmedit.hooks import Hooks, ReplayBelow
from lmedit.methods.base import HParams, Method, Stopwatch
from lmedit.methods.keyvalue import _encode_mixed, context_templates
from lmedit.models.spec import get_module, is_conv1d
from lmedit.patch import COMPONENTS, Component
from lmedit.requests import EditRequest
from lmedit.scoring import Batch, target_logprobs, tokenize


# ---------------------------------------------------------------------------------------------- memory
@dataclass(eq=False)
class Memory:
    """One side memory ``W + τ``: a shard (open while ``mask`` is set) or a merge of shards."""

    id: str
    serial: int  # creation order (memories are kept sorted by it)
    delta: torch.Tensor  # τ, float32, [d_model, d_mlp], on the CPU
    mask: torch.Tensor | None  # bool [d_model, d_mlp]: the entries this open shard may train
    edits: int
    min_act: float  # smallest in-scope Δ_act its edits reached
    act_ratio: float
    shards: int = 1
    merged: bool = False
    version: int = 0

    @property
    def threshold(self) -> float:
        return self.act_ratio * self.min_act

    def meta(self) -> dict[str, Any]:
        return {"id": self.id, "serial": self.serial, "edits": self.edits, "min_act": self.min_act,
                "act_ratio": self.act_ratio, "shards": self.shards, "merged": self.merged, "version": self.version,
                "has_mask": self.mask is not None}


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


class SideMemory(Adaptor):
    """WISE's side memories on one ``W_out`` module (see the module docstring)."""

    transient = ("_handle", "_root_handle", "_attention", "_route", "_on_device", "last_activations")

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.memories: list[Memory] = []
        self.enabled = True
        self._root_handle: Any = None
        self._attention: torch.Tensor | None = None
        self._route: torch.Tensor | None = None
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
        return SideMemoryEdit(self.path, [], [_copy(m) for m in self.memories])

    # -------------------------------------------------------------------------------- inference
    def _delta(self, memory: Memory, device: torch.device) -> torch.Tensor:
        cache = self._on_device if self._on_device is not None else {}
        key = (memory.id, memory.version, str(device))
        if key not in cache:
            cache = {k: v for k, v in cache.items() if k[0] != memory.id}
            cache[key] = memory.delta.to(device)
        self._on_device = cache
        return cache[key]

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the answering memory per row of ``x`` ``[B, T, d_mlp]`` (``-1``: the main memory)."""
        batch, length = x.shape[:2]
        mask = self._attention
        cached = mask is not None and mask.dim() == 2 and mask.shape[1] > length  # a continuation of a prefix
        if cached and self._route is not None and self._route.shape[0] == batch:
            return self._route
        weights = token_weights(mask, batch, length, x.device, prefill=not cached)
        acts = torch.stack([routing_activation(x, self._delta(m, x.device), weights) for m in self.memories])
        self.last_activations = acts
        thresholds = torch.tensor([m.threshold for m in self.memories], device=x.device)[:, None]
        acts = torch.where(acts >= thresholds, acts, torch.full_like(acts, -1.0))
        best, index = acts.max(dim=0)
        self._route = torch.where(best >= 0, index, torch.full_like(index, -1))
        return self._route

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
            delta = self._delta(self.memories[i], x.device)
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
        self.memories = sorted(kept + [_copy(m) for m in add], key=lambda m: m.serial)
        self._route = None


def _copy(m: Memory) -> Memory:
    return replace(m, delta=m.delta.clone(), mask=None if m.mask is None else m.mask.clone())


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
        return out

    def manifest(self) -> dict[str, Any]:
        return {"path": self.path, "before": [m.meta() for m in self.before], "after": [m.meta() for m in self.after]}

    @classmethod
    def restore(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "SideMemoryEdit":
        def load(side: str) -> list[Memory]:
            out = []
            for i, meta in enumerate(manifest[side]):
                meta = dict(meta)
                has_mask = meta.pop("has_mask")
                out.append(Memory(delta=tensors[f"{side}.{i}.delta"],
                                  mask=tensors[f"{side}.{i}.mask"].bool() if has_mask else None, **meta))
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


# ---------------------------------------------------------------------------------------------- method
@dataclass
class WISEHParams(HParams):
    """Hyper-parameters of WISE (published defaults for Llama-2-7B except the margins; see the module docstring).

    Attributes:
        layer: the layer whose ``W_out`` gets the side memory (default: depth fraction 27/31).
        mode: ``"merge"`` (WISE-Merge) or ``"retrieve"`` (WISE-Retrieve).
        alpha, beta, gamma: the routing margins (out-of-scope ceiling, in-scope floor, gap).
        act_ratio: ε = act_ratio · the smallest in-scope activation of a memory's edits.
        shard_size: edits per shard (``save_freq``); merge_every: edits between merges (``merge_freq``).
        irrelevant: unrelated texts for ``x_irr`` (default: sentences of ``corpus``).
    """

    layer: int | None = None
    mode: Literal["merge", "retrieve"] = "merge"
    lr: float = 1.0
    steps: int = 70
    stop_loss: float = 0.02
    mask_ratio: float = 0.2
    norm_constraint: float = 1.0
    alpha: float = 20.0
    beta: float = 60.0
    gamma: float = 20.0
    act_ratio: float = 0.88
    shard_size: int = 500
    merge_every: int = 1000
    density: float = 0.53
    context_lengths: tuple[tuple[int, int], ...] = ((5, 5), (10, 5))
    n_irrelevant: int = 1
    corpus: str | None = None
    irrelevant: tuple[str, ...] | None = None
    seed: int = 0

    def _defaults(self, model: Any) -> dict[str, Any]:
        return {"layer": model.spec.layer_at(27 / 31)}


class WISE(Method):
    name = "wise"
    HParams = WISEHParams

    def compute(self, model: Any, hp: WISEHParams, requests: Sequence[EditRequest],
                originals: dict[str, torch.Tensor]) -> tuple[list[Component], dict[str, Any]]:
        _check(hp)
        path = model.spec.path(hp.layer, "mlp_out")
        watch = Stopwatch()
        side = adaptors(model).get(path)
        if side is not None and not isinstance(side, SideMemory):
            raise EditError(f"{path} already carries a {type(side).__name__}; WISE needs its own side memory there")
        memories = list(side.memories) if isinstance(side, SideMemory) else []
        shard = self._open_shard(model, hp, memories)
        with watch("batch"):
            batch, is_edit, weights = self._batch(model, hp, requests)
        if isinstance(side, SideMemory):
            side.enabled = False  # training sees only the shard being trained
        try:
            with watch("train"):
                delta, act, info = self._train(model, hp, path, shard, batch, is_edit, weights)
        finally:
            if isinstance(side, SideMemory):
                side.enabled = True
        written = replace(shard, delta=delta, edits=shard.edits + len(requests), min_act=min(shard.min_act, act),
                          version=shard.version + 1)
        if written.edits >= hp.shard_size:
            written.mask = None  # the shard is full: closed
        post = [m for m in memories if m.id != shard.id] + [written]
        total = sum(m.edits for m in post)
        merged_now = total // hp.merge_every > (total - len(requests)) // hp.merge_every
        if merged_now:  # Merge: everything into one memory; Retrieve: the shards since the last merge
            group = [m for m in post if hp.mode == "merge" or not m.merged]
            with watch("merge"):
                merged = _merge(group, hp, serial=min(m.serial for m in group))
            post = [m for m in post if m not in group] + [merged]
        removed = [m for m in memories if not any(m is q for q in post)]
        added = [q for q in post if not any(q is m for m in memories)]
        info.update({"in_scope_act": round(act, 3), "threshold": round(written.threshold, 3),
                     "memories": len(post), "merged": merged_now, "timing": watch.report()})
        return [SideMemoryEdit(path, [_copy(m) for m in removed], [_copy(m) for m in added])], info

    # ------------------------------------------------------------------------------ internals
    @staticmethod
    def _open_shard(model: Any, hp: WISEHParams, memories: list[Memory]) -> Memory:
        """The open shard to train (a new one, with a fresh random mask, when none is open)."""
        open_ = [m for m in memories if m.mask is not None]
        if open_:
            return open_[-1]
        serial = max((m.serial for m in memories), default=-1) + 1
        d_model, d_mlp = model.spec.hidden_size, model.spec.mlp_size
        g = torch.Generator().manual_seed(hp.seed * 100_003 + serial)
        mask = torch.rand(d_model, d_mlp, generator=g) < hp.mask_ratio
        return Memory(uuid.uuid4().hex[:16], serial, torch.zeros(d_model, d_mlp), mask, 0, float("inf"), hp.act_ratio)

    @staticmethod
    def _batch(model: Any, hp: WISEHParams, requests: Sequence[EditRequest]) -> tuple[Batch, torch.Tensor, torch.Tensor]:
        """Edit rows (every request under every context prefix, with its target) + unrelated rows, and the
        ``[B, T]`` weights of the tokens whose activation routes each row.

        An edit row is routed by its prompt's own tokens (not the context prefix, not the target): at
        inference the decision is taken on the bare prompt. Unrelated rows count all their tokens.
        """
        lengths = tuple((int(a), int(b)) for a, b in hp.context_lengths)
        templates = context_templates(model, lengths)
        prompts: list[str] = []
        targets: list[str | None] = []
        for r in requests:
            for t in templates:
                prompts.append(t.replace("{}", r.prompt))
                targets.append(r.target_new)
        pool = list(hp.irrelevant) if hp.irrelevant else unrelated_sentences(model, hp.corpus)
        for r in requests:
            rng = random.Random(f"{hp.seed}:{r.prompt}:{r.target_new}")
            for text in rng.sample(pool, min(hp.n_irrelevant, len(pool))):
                prompts.append(text)
                targets.append(None)
        batch = _encode_mixed(model, prompts, targets).to(model.device)
        is_edit = torch.tensor([t is not None for t in targets], device=model.device)
        weights = token_weights(batch.attention_mask, *batch.input_ids.shape, model.device)
        width = batch.input_ids.shape[1]
        n_prompt = {r.prompt: len(tokenize(model, r.prompt)[0]) - 1 for r in requests}  # without doc start
        for b, prompt in enumerate(prompts[: len(requests) * len(templates)]):
            own = n_prompt[requests[b // len(templates)].prompt]
            end = width - batch.target_lengths[b]
            weights[b, : max(0, end - own)] = 0
            weights[b, end:] = 0
        return batch, is_edit, weights

    @staticmethod
    def _train(model: Any, hp: WISEHParams, path: str, shard: Memory, batch: Batch, is_edit: torch.Tensor,
               weights: torch.Tensor) -> tuple[torch.Tensor, float, dict[str, Any]]:
        """Gradient descent on ``τ`` (see the module docstring); returns (τ, in-scope Δ_act, info)."""
        device = model.device
        tau = shard.delta.to(device).clone().requires_grad_(True)
        mask = shard.mask.to(device=device, dtype=torch.float32)  # type: ignore[union-attr]
        conv1d = is_conv1d(get_module(model.module, path))
        n_edit_tokens = batch.target_mask.sum(1).clamp(min=1)
        optimizer = torch.optim.SGD([tau], lr=hp.lr)
        blocks = get_module(model.module, model.spec.blocks)
        losses: list[float] = []

        def acts_and_nll(hooks: Hooks, key: str) -> tuple[torch.Tensor, torch.Tensor]:
            logp = target_logprobs(model, batch)
            nll = -(logp.sum(1) / n_edit_tokens)[is_edit].mean()
            act = routing_activation(hooks[key].float(), tau, weights)
            return act, nll

        with Hooks(model.module) as hooks, ReplayBelow(blocks, model.spec._layer(hp.layer)), torch.enable_grad():
            key = hooks.read(path, "input")
            hooks.add_to_weight(path, (lambda: tau.T) if conv1d else (lambda: tau))
            steps = 0
            for steps in range(1, hp.steps + 1):
                act, nll = acts_and_nll(hooks, key)
                a_e, a_irr = act[is_edit], act[~is_edit]
                loss = nll + torch.relu(hp.beta - a_e).mean()
                if a_irr.numel():
                    loss = loss + torch.relu(a_irr - hp.alpha).mean() + \
                        torch.relu(hp.gamma - (a_e[:, None] - a_irr[None, :])).mean()
                losses.append(float(loss.detach()))
                if losses[-1] <= hp.stop_loss:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                tau.grad.mul_(mask)  # type: ignore[union-attr]
                optimizer.step()
                with torch.no_grad():
                    tau.clamp_(-hp.norm_constraint, hp.norm_constraint)
            with torch.no_grad():
                act, nll = acts_and_nll(hooks, key)
        in_scope = float(act[is_edit].mean())
        out_scope = float(act[~is_edit].mean()) if bool((~is_edit).any()) else float("nan")
        info = {"steps": steps, "loss": round(losses[-1], 4) if losses else None, "nll": round(float(nll), 4),
                "out_scope_act": round(out_scope, 3)}
        return tau.detach().float().cpu(), in_scope, info


def _merge(group: Sequence[Memory], hp: WISEHParams, serial: int) -> Memory:
    """The TIES merge of ``group`` as one closed, merged memory."""
    delta = ties_merge([m.delta for m in group], hp.density) if len(group) > 1 else group[0].delta.clone()
    return Memory(uuid.uuid4().hex[:16], serial, delta, None, sum(m.edits for m in group),
                  min(m.min_act for m in group), group[-1].act_ratio, sum(m.shards for m in group), True)


def unrelated_sentences(model: Any, corpus: str | None = None) -> list[str]:
    """Sentences of 6–40 words from ``corpus`` (default: the benchmark data's Wikipedia passages)."""
    key = ("wise_unrelated", corpus)
    if key not in model.cache:
        from lmedit.stats import corpus_texts

        texts, _ = corpus_texts(corpus, model, max_tokens=5_000)
        sentences = [s.strip() for text in texts for s in re.split(r"(?<=[.!?])\s+", text)]
        model.cache[key] = [s for s in sentences if 6 <= len(s.split()) <= 40] or texts
    return model.cache[key]


def _check(hp: WISEHParams) -> None:
    if hp.mode not in ("merge", "retrieve"):
        raise EditError(f"WISE mode must be 'merge' or 'retrieve', not {hp.mode!r}")
    if not 0 < hp.mask_ratio <= 1:
        raise EditError(f"mask_ratio must be in (0, 1], not {hp.mask_ratio}")
    if hp.shard_size < 1 or hp.merge_every < 1:
        raise EditError("shard_size and merge_every must be at least 1")
