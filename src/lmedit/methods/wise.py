"""WISE (Wang et al. 2024): lifelong editing in a side memory beside one MLP's ``W_out``, routed by its
own activation (the memory structure, routing and patch component: ``lmedit.methods.side_memory``).

The side memory sits on the output projection of Llama-7B's layer 27 of 32 (``down_proj``; the same
depth fraction here). **Editing** trains ``τ`` of the open shard with plain gradient descent (lr 1.0,
up to 70 steps, stopping once the loss is below ``stop_loss``) on

    L = NLL(y | x_e) + mean relu(Δ_act(x_irr) − α) + mean relu(β − Δ_act(x_e))
        + mean relu(γ − (Δ_act(x_e) − Δ_act(x_irr))) + mean relu(Δ_act(x_m) − α)

where ``x_e`` is the edit prompt with its target under every context prefix (the model-written
``"{}"``-templates of ROME, 5 of 5 and 5 of 10 tokens), ``x_irr`` are unrelated sentences
(``n_irrelevant`` per edit, from the corpus: the benchmark data's Wikipedia passages by default) and
``x_m`` are **replayed** prompts of earlier memories' edits (the paper's ``L_memo``: ``replay`` per
edit, default 2 in retrieve mode with sparse shards, so a new shard stays silent on what older shards
answer; see "Sharding and merging" for why not with dense ones). The side
memory is on for every row during training. After each step ``τ``'s gradient is multiplied by the
shard's random **mask** (a fraction ``mask_ratio`` of its entries, 0.2 in the paper; the paper's knowledge
sharding) and ``τ`` is clamped to ``|τ_ij| ≤ norm_constraint``.

**Margins.** The published α = 5, β = 20, γ = 10 were set for Llama-2-7B. On SmolLM2-135M the
ceiling α = 5 is out of reach (a trained side memory activates at 30–80 on unrelated sentences) and
its gradient fights the edit (one ZsRE edit: NLL 0.36, unrelated 34 vs in-scope 49 after 70 steps);
lmedit's defaults α = 20, β = 60, γ = 20 separate them (NLL 0.24, unrelated 17 vs in-scope 97).

**Step size.** At the paper's lr 1.0 the descent on ``τ`` swings with period 2 on SmolLM2-135M: over the first
three sequential ZsRE edits (retrieve mode) the loss alternates step by step between a low and a high value for all
70 steps (46 / 74, 12 / 111 and 46 / 62 at the end) and ends wherever step 70 falls; at lr 0.25 it falls almost
monotonically, from 11–82 to ≤ 2.3 by step 10 (the margins nearly met) and 0.1–0.6 at step 70, mostly the target's
NLL. After 10 edits the two score alike (Rel. / Gen. / Loc. 0.95 / 0.91 / 1.00 at lr 1.0, 0.95 / 0.94 / 1.00 at
0.25); after 100, lr 0.25 leads on token accuracy (0.90 / 0.81 / 1.00 against 0.86 / 0.80 / 1.00, efficacy 0.98
against 0.95) and trails on exact match (0.59 / 0.43 against 0.63 / 0.49): the early edits hold better, the latest
are written a little less. Neither wins outright, so the published lr stays the default
(``runs/smollm2-135m-zsre-wise-retrieve-lr0.25-sequential-1000`` continues toward T = 1,000).

**Rehearsal (lmedit's addition).** All edits of a shard train the same masked entries of ``τ``, so
each new edit moves the outputs of the shard's earlier edits: on SmolLM2-135M (ρ = 0.2; a 576×1536 ``W_out``,
50× smaller than Llama-2-7B's) 20 sequential ZsRE edits end with the first ten at token accuracy 0.61
and the last ten at 0.80, every one of them still routed to the memory — overwritten, not misrouted.
``rehearse`` = k adds k earlier edits of the open shard per new edit as extra edit rows (bare prompt and
target; a seeded sample), so the NLL keeps them: k = 4 gives 0.81 / 0.90 (Rel. 0.70 → 0.85) at 1.4× the
cost per edit. The shard keeps its edits' targets for this (``Memory.targets``, saved with the patch).
Gemma-3-270M needs more: its keys at the WISE layer are more alike than SmolLM2's (last-token keys of 40 ZsRE
prompts, mean cosine between prompts 0.91 against 0.80; ``benchmarks/key_geometry.py``), so each edit moves
the others' outputs further. Over its first 10 sequential ZsRE edits (retrieve mode, lr 1.0, every edit's own
loss at NLL ≤ 0.08 with the margins met) ``rehearse=4`` ends at token accuracy 0.77 / rephrase 0.58,
``rehearse=8`` at 0.95 / 0.68 and ``rehearse=9`` (every earlier edit) at 0.98 / 0.71 (lr 0.25 leaves the margins
unmet on Gemma's small keys: loss 3–13 after 70 steps); pass ``rehearse=8`` there. Choosing the four earlier
edits whose prompts' mean keys are nearest the new one's (cosine), instead of a random four, does not do it: 0.79
/ 0.61 — with keys this alike, every earlier edit is moved. Fewer edits per ``τ`` do: after 60 edits (bf16) shards
of 25 score 0.90 / 0.74 against 0.78 / 0.67 in one of 73 (overwritten, not misrouted); pass ``shard_size=25`` too.

**Mask ratio on small models.** ρ = 0.2 gives a Llama-2-7B shard 9M trainable entries; on SmolLM2's
576×1536 ``W_out`` it gives 177k, and a shard runs out of room long before its 500 edits: with
rehearsal, 100 sequential ZsRE edits end at token accuracy 0.61 (spread over all of them, not the
early ones), while with ρ = 1.0 50 edits keep 0.95 (paraphrase 0.85, locality 1.00). The default
ρ keeps the paper's trainable entries per shard, capped at the whole matrix (``default_mask_ratio``);
the price is merging: shards of ρ = 1 overlap everywhere, so TIES merging averages them instead of
joining disjoint subspaces.

**Unrelated inputs.** ``corpus`` may name an edit dataset: its locality prompts with their answers are
then the ``x_irr`` (the paper's setting for ZsRE: the train split's ``"{loc} {loc_ans}"``, disjoint from
the evaluated cases). The routing activation partly measures the input's format: trained against
Wikipedia sentences, a WISE memory of 20 ZsRE edits took 12 of the 20 test NQ questions (Loc. 0.89);
against ZsRE-train's questions none (Loc. 1.00).

**Sharding and merging.** A shard takes ``shard_size`` edits (500) and is then closed; the next edit
opens a new shard with a fresh mask. Every ``merge_every`` edits (1000) shards are merged TIES-style
(``side_memory.ties_merge``, density 0.53): **WISE-Merge** (``mode="merge"``) merges everything into
one side memory; **WISE-Retrieve** (``mode="retrieve"``) merges only the shards since the last merge,
keeping earlier merged memories apart to be retrieved by activation. On small models retrieve mode's
shards are smaller and never merged (``default_sharding``): a dense shard of SmolLM2 holds the paper's
edits per trainable entry at 49 edits, and TIES-merging dense shards averages them (50 ZsRE edits: two
shards of 25 kept apart 0.96 / 0.89 / 1.00 Rel / Gen / Loc, merged 0.89 / 0.79 / 1.00; one dense
shard of 360 edits falls to 0.76 / 0.66). Nor do dense shards replay older memories' prompts: with the
α ceiling out of reach on a small model (unrelated inputs sit at 65–130 against α = 20), replay makes
the new shard fire on everything instead — on SmolLM2, a second shard of 12 ZsRE edits trained with
replay 2 reached 101–141 on unrelated test questions (5 of 61 above its threshold) and 155–258 on its
own prompts; without replay 53–84 (none above) and 115–194, its own prompts and the first shard's
still routed to the right memory (59 of 61). A 100-edit run with replay had routed 82 of 110 unrelated
questions into the second shard (Loc. 0.33).

**Threshold (lmedit's change).** A memory's ``min_act`` is measured on its edits' bare prompts under its
``τ`` as it is after each edit and each merge (``side_memory.measured_routing``), not kept from training
time: later edits and merges move every activation (see there for the figures). Training is unchanged.

**Retrieval (lmedit's change).** With several memories, ``retrieve_by="key"`` (default) lets WISE's gate
decide *whether* the side memory answers and the nearest stored prompt key decide *which* memory does
(``side_memory``'s docstring has the rule and the figures: on SmolLM2, 280 sequential ZsRE edits in 6
memories, rephrasings answered by their own memory 225 → 270 of 280; keys compared after whitening by the
anchors' statistics since session 51, ``SideMemory.key_metric``: on Gemma-3 810 → 947 of 1,000); ``"activation"``
is the paper's choice by activation (relative to each memory's threshold). Memories written without anchors get
them at the next edit with ``"key"``. The gate's threshold ``act_ratio`` and the choice among memories act only
at inference (training never routes), so ``benchmarks/wise_threshold.py`` re-scores a run's state under others.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any, Literal, Sequence

import torch

from lmedit.adaptors import adaptors
from lmedit.errors import EditError
from lmedit.hooks import Hooks, ReplayBelow, read_module
from lmedit.methods.base import HParams, Method, Stopwatch
from lmedit.methods.keyvalue import context_templates
from lmedit.methods.side_memory import (Memory, SideMemory, SideMemoryEdit, copy_memory, measured_routing,
                                        routing_activation, ties_merge, token_weights)
from lmedit.methods.unrelated import sample_per_request, unrelated_sentences
from lmedit.models.spec import get_module, is_conv1d
from lmedit.patch import Component
from lmedit.requests import EditRequest
from lmedit.scoring import Batch, encode, target_logprobs, tokenize

UNRELATED, REPLAY = 1, 2  # kinds of the target-less training rows (``TrainingRows.other_kind``)

__all__ = ["WISE", "WISEHParams", "Memory", "SideMemory", "SideMemoryEdit", "ties_merge", "unrelated_sentences"]


# ---------------------------------------------------------------------------------------------- method
@dataclass
class WISEHParams(HParams):
    """Hyper-parameters of WISE (published defaults for Llama-2-7B except the margins; see the module docstring).

    Attributes:
        layer: the layer whose ``W_out`` gets the side memory (default: depth fraction 27/31).
        mode: ``"merge"`` (WISE-Merge) or ``"retrieve"`` (WISE-Retrieve).
        alpha, beta, gamma: the routing margins (out-of-scope ceiling, in-scope floor, gap).
        act_ratio: ε = act_ratio · the smallest in-scope activation of a memory's edits.
        mask_ratio: ρ, the fraction of ``τ``'s entries a shard trains (default ``default_mask_ratio``: the
            paper's 0.2 on Llama-2-7B's 45M-entry ``W_out``, 1.0 on models whose ``W_out`` is 9M entries or less).
        shard_size: edits per shard (``save_freq``); merge_every: edits between merges (``merge_freq``);
            defaults from ``default_sharding`` (the paper's 500 / 1,000, but smaller shards kept apart
            in retrieve mode on small models).
        irrelevant: unrelated texts for ``x_irr`` (default: sentences of ``corpus``).
        replay: earlier memories' edit prompts replayed per edit with the α ceiling (``L_memo``;
            default 2 in retrieve mode with sparse shards, the paper's; 0 in merge mode, where all shards
            end in one memory anyway, and with dense shards, where it makes the new shard fire on everything).
        retrieve_by: how a memory is chosen once WISE's gate lets an input into the side memory:
            ``"key"`` (the memory holding the edit prompt nearest the input by mean key, compared whitened by
            default — ``SideMemory.key_metric``; lmedit's) or
            ``"activation"`` (the largest Δ_act relative to the memory's threshold; the paper takes the
            largest raw Δ_act).
        rehearse: earlier edits of the open shard trained again (bare prompt and target) per new edit, so
            later edits of a shard do not overwrite earlier ones (lmedit's addition, default 4; 0 is the
            paper's WISE; see the module docstring).
    """

    layer: int | None = None
    mode: Literal["merge", "retrieve"] = "merge"
    lr: float = 1.0
    steps: int = 70
    stop_loss: float = 0.02
    mask_ratio: float | None = None
    norm_constraint: float = 1.0
    alpha: float = 20.0
    beta: float = 60.0
    gamma: float = 20.0
    act_ratio: float = 0.88
    shard_size: int | None = None
    merge_every: int | None = None
    density: float = 0.53
    context_lengths: tuple[tuple[int, int], ...] = ((5, 5), (10, 5))
    n_irrelevant: int = 1
    corpus: str | None = None
    irrelevant: tuple[str, ...] | None = None
    replay: int | None = None
    rehearse: int = 4
    retrieve_by: Literal["key", "activation"] = "key"
    seed: int = 0

    def _defaults(self, model: Any) -> dict[str, Any]:
        d_model, d_mlp = model.spec.hidden_size, model.spec.mlp_size
        rho = self.mask_ratio if self.mask_ratio is not None else default_mask_ratio(d_model, d_mlp)
        shard_size, merge_every = default_sharding(self.mode, d_model, d_mlp, rho)
        return {"layer": model.spec.layer_at(27 / 31), "replay": 2 if self.mode == "retrieve" and rho < 1.0 else 0,
                "mask_ratio": rho, "shard_size": shard_size, "merge_every": merge_every}


LLAMA2_7B_W_OUT = 4096 * 11008  # entries of the side memory the published mask ratio 0.2 was set on


def default_mask_ratio(d_model: int, d_mlp: int) -> float:
    """ρ giving a shard the trainable entries the paper's shards have (0.2 of Llama-2-7B's ``W_out``),
    capped at the whole matrix: ``min(1, 0.2 · 4096·11008 / (d_model·d_mlp))`` — 0.2 at 7B, 1.0 below ~1.5B."""
    return min(1.0, 0.2 * LLAMA2_7B_W_OUT / (d_model * d_mlp))


def default_sharding(mode: str, d_model: int, d_mlp: int, mask_ratio: float) -> tuple[int, int]:
    """``(shard_size, merge_every)``. WISE-Merge: the paper's 500 and 1,000 (everything ends in one memory
    anyway). WISE-Retrieve: a shard holds the paper's edits per trainable entry, 500 per 0.2·4096·11008
    entries, i.e. ``round(500 · ρ·d·m / (0.2 · 4096·11008))`` (500 at 7B; 49 on SmolLM2-135M, 73 on
    Gemma-3-270M), and dense shards (ρ = 1) are never merged (``merge_every = shard_size``: each closed
    shard is its own memory, retrieved by activation), because TIES-merging shards that train the same
    entries averages them; sparse shards merge every 1,000 edits as in the paper."""
    if mode != "retrieve":
        return 500, 1000
    shard_size = max(1, round(500 * mask_ratio * d_model * d_mlp / (0.2 * LLAMA2_7B_W_OUT)))
    return shard_size, shard_size if mask_ratio >= 1.0 else 1000


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
            replayed = [p for m in memories if m.id != shard.id for p in m.prompts]
            rows = self._batch(model, hp, requests, replayed, list(zip(shard.prompts, shard.targets)))
        if isinstance(side, SideMemory):
            side.enabled = False  # training sees only the shard being trained
        try:
            with watch("train"):
                delta, act, info = self._train(model, hp, path, shard, rows)
        finally:
            if isinstance(side, SideMemory):
                side.enabled = True
        anchors = hp.retrieve_by == "key"
        written = measured_routing(model, path, replace(
            shard, delta=delta, edits=shard.edits + len(requests), version=shard.version + 1,
            prompts=shard.prompts + [r.prompt for r in requests], targets=shard.targets + [r.target_new for r in requests]),
            anchors)
        if written.edits >= hp.shard_size:
            written.mask = None  # the shard is full: closed
        post = [measured_routing(model, path, replace(m, version=m.version + 1))  # written without anchors: give them
                if anchors and m.anchors is None and m.prompts else m for m in memories if m.id != shard.id] + [written]
        total = sum(m.edits for m in post)
        merged_now = total // hp.merge_every > (total - len(requests)) // hp.merge_every
        if merged_now:  # Merge: everything into one memory; Retrieve: the shards since the last merge
            group = [m for m in post if hp.mode == "merge" or not m.merged]
            with watch("merge"):
                merged = measured_routing(model, path, _merge(group, hp, serial=min(m.serial for m in group)), anchors)
            post = [m for m in post if m not in group] + [merged]
        removed = [m for m in memories if not any(m is q for q in post)]
        added = [q for q in post if not any(q is m for m in memories)]
        info.update({"in_scope_act": round(act, 3), "threshold": round(written.threshold, 3),
                     "memories": len(post), "merged": merged_now, "timing": watch.report()})
        return [SideMemoryEdit(path, [copy_memory(m) for m in removed], [copy_memory(m) for m in added])], info

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
    def _batch(model: Any, hp: WISEHParams, requests: Sequence[EditRequest], replayed: Sequence[str] = (),
               shard_edits: Sequence[tuple[str, str]] = ()) -> "TrainingRows":
        """The training rows: edit rows (every request under every context prefix, with its target, and
        ``rehearse`` earlier edits of the open shard per request, bare, with theirs) and target-less rows
        (``n_irrelevant`` unrelated sentences and ``replay`` earlier memories' prompts per request), with
        the tokens whose activation routes each row.

        An edit row is routed by its prompt's own tokens (not the context prefix, not the target): at
        inference the decision is taken on the bare prompt. Other rows count all their tokens.
        """
        lengths = tuple((int(a), int(b)) for a, b in hp.context_lengths)
        templates = context_templates(model, lengths)
        pairs = [(t.replace("{}", r.prompt), r.prompt, r.target_new) for r in requests for t in templates]
        own_prompts = {r.prompt for r in requests}
        earlier = [e for e in shard_edits if e[0] not in own_prompts]
        for sample in sample_per_request(requests, earlier, hp.rehearse, hp.seed, "rehearse:"):
            pairs += [(p, p, t) for p, t in sample]
        edit = encode(model, [row for row, _, _ in pairs], [t for _, _, t in pairs]).to(model.device)
        edit_weights = token_weights(edit.attention_mask, *edit.input_ids.shape, model.device)
        width = edit.input_ids.shape[1]
        n_prompt = {p: len(tokenize(model, p)[0]) - 1 for p in {p for _, p, _ in pairs}}  # without doc start
        for b, (_, prompt, _) in enumerate(pairs):
            own = n_prompt[prompt]
            end = width - edit.target_lengths[b]
            edit_weights[b, : max(0, end - own)] = 0
            edit_weights[b, end:] = 0

        texts: list[str] = []
        kinds: list[int] = []

        def draw(pool: Sequence[str], n: int, salt: str, kind: int) -> None:
            for sample in sample_per_request(requests, pool, n, hp.seed, salt):
                texts.extend(sample)
                kinds.extend([kind] * len(sample))

        draw(list(hp.irrelevant) if hp.irrelevant else unrelated_sentences(model, hp.corpus), hp.n_irrelevant, "",
             UNRELATED)
        draw(sorted({p for p in replayed if p not in own_prompts}), int(hp.replay or 0), "replay:", REPLAY)
        if not texts:
            return TrainingRows(edit, edit_weights, None, torch.zeros(0, dtype=torch.long), None)
        other = encode(model, texts).to(model.device)
        return TrainingRows(edit, edit_weights, other, torch.tensor(kinds, device=model.device),
                            token_weights(other.attention_mask, *other.input_ids.shape, model.device))

    @staticmethod
    def _train(model: Any, hp: WISEHParams, path: str, shard: Memory, rows: "TrainingRows"
               ) -> tuple[torch.Tensor, float, dict[str, Any]]:
        """Gradient descent on ``τ`` (see the module docstring); returns (τ, in-scope Δ_act, info).

        ``τ`` acts on ``W_out``'s output, so the keys ``a`` (``W_out``'s inputs) never change during
        training: the unrelated and replayed rows, which enter the loss only through ``Δ_act = ‖τ a‖``,
        are run once up to ``W_out``; only the edit rows, which need the target's NLL, run every step
        (from the edited layer up: the blocks below are replayed).
        """
        device = model.device
        tau = shard.delta.to(device).clone().requires_grad_(True)
        mask = shard.mask.to(device=device, dtype=torch.float32)  # type: ignore[union-attr]
        conv1d = is_conv1d(get_module(model.module, path))
        n_edit_tokens = rows.edit.target_mask.sum(1).clamp(min=1)
        optimizer = torch.optim.SGD([tau], lr=hp.lr)
        blocks = get_module(model.module, model.spec.blocks)
        losses: list[float] = []
        other_keys = None
        if rows.other is not None:
            with torch.no_grad():
                other_keys = read_module(model, rows.other, path).float()
        is_irr, is_memo = rows.other_kind == UNRELATED, rows.other_kind == REPLAY
        empty = torch.zeros(0, device=device)

        def activations_and_nll(hooks: Hooks, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            logp = target_logprobs(model, rows.edit)
            nll = -(logp.sum(1) / n_edit_tokens).mean()
            a_e = routing_activation(hooks[key].float(), tau, rows.edit_weights)
            if other_keys is None:
                return a_e, empty, empty, nll
            a_o = routing_activation(other_keys, tau, rows.other_weights)  # type: ignore[arg-type]
            return a_e, a_o[is_irr], a_o[is_memo], nll

        with Hooks(model.module) as hooks, ReplayBelow(blocks, model.spec._layer(hp.layer)), torch.enable_grad():
            key = hooks.read(path, "input")
            hooks.add_to_weight(path, (lambda: tau.T) if conv1d else (lambda: tau))
            steps = 0
            for steps in range(1, hp.steps + 1):
                a_e, a_irr, a_m, nll = activations_and_nll(hooks, key)
                loss = nll + torch.relu(hp.beta - a_e).mean()
                if a_irr.numel():
                    loss = loss + torch.relu(a_irr - hp.alpha).mean() + \
                        torch.relu(hp.gamma - (a_e[:, None] - a_irr[None, :])).mean()
                if a_m.numel():  # L_memo
                    loss = loss + torch.relu(a_m - hp.alpha).mean()
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
                a_e, a_irr, a_m, nll = activations_and_nll(hooks, key)
        info = {"steps": steps, "loss": round(losses[-1], 4) if losses else None, "nll": round(float(nll), 4),
                "out_scope_act": round(float(a_irr.mean()), 3) if a_irr.numel() else float("nan")}
        if a_m.numel():
            info["replay_act"] = round(float(a_m.mean()), 3)
        return tau.detach().float().cpu(), float(a_e.mean()), info


@dataclass
class TrainingRows:
    """WISE's training inputs (``WISE._batch``): the edit rows with their targets and routing-token
    weights, and the target-less rows (``other``: unrelated sentences and replayed prompts, ``other_kind``
    ``UNRELATED`` or ``REPLAY``) that enter the loss only through their routing activation."""

    edit: Batch
    edit_weights: torch.Tensor
    other: Batch | None
    other_kind: torch.Tensor
    other_weights: torch.Tensor | None


def _merge(group: Sequence[Memory], hp: WISEHParams, serial: int) -> Memory:
    """The TIES merge of ``group`` as one closed, merged memory."""
    delta = ties_merge([m.delta for m in group], hp.density) if len(group) > 1 else group[0].delta.clone()
    return Memory(uuid.uuid4().hex[:16], serial, delta, None, sum(m.edits for m in group),
                  min(m.min_act for m in group), group[-1].act_ratio, sum(m.shards for m in group), True,
                  prompts=[p for m in group for p in m.prompts], targets=[t for m in group for t in m.targets])


def _check(hp: WISEHParams) -> None:
    if hp.mode not in ("merge", "retrieve"):
        raise EditError(f"WISE mode must be 'merge' or 'retrieve', not {hp.mode!r}")
    if hp.retrieve_by not in ("key", "activation"):
        raise EditError(f"WISE retrieve_by must be 'key' or 'activation', not {hp.retrieve_by!r}")
    if hp.mask_ratio is None or not 0 < hp.mask_ratio <= 1:
        raise EditError(f"mask_ratio must be in (0, 1], not {hp.mask_ratio}")
    # the counts' ranges (rehearse, replay, shard_size, merge_every) are checked by HParams itself
    if hp.shard_size is None or hp.merge_every is None:
        raise EditError("shard_size and merge_every must be set")
