"""Shared machinery of the locate-then-edit methods: context templates, subject positions, keys k*
and values v*. Written once; ROME, MEMIT and their relatives call it.

An MLP is ``m = W_out σ(W_in γ(h))``; its **key** ``k`` is the input of ``W_out`` and its **value**
the output. At the subject's last token:

* ``k* = mean_j k(prefix_j + prompt)`` over context prefixes (``"{}"`` and short texts the model
  writes itself, each followed by ``". {}"``), so the edit does not depend on one exact context;
* ``δ`` is optimised so that adding it to the layer's value at that position makes the model produce
  the target after every prefixed prompt:
  ``L(δ) = mean_j NLL(target | prefix_j + prompt; v + δ) + kl_factor · KL(P₀ ‖ P_δ)("{subject} is a")
  + weight_decay · ‖δ‖² / ‖v̄‖²`` (with ``prompt_share`` = s the prompt's own, unprefixed row weighs s and
  the prefixed ones share 1 − s instead of the uniform mean), with ``‖δ‖ ≤ clamp_norm_factor · ‖v̄‖``
  enforced after each Adam step, stopping once the target's mean probability (weighted like the NLL)
  passes ``stop_prob`` — per request: optimised in a group, a converged request's ``δ`` is frozen while the
  others go on (Adam kept stepping a converged ``δ`` at the norm bound: on Gemma-3-270M one CounterFact target
  fell from 0.97 back to 0.02 within a group of 8). Only ``δ`` has a gradient; the
  blocks below the layer run once (``ReplayBelow``); logits are computed only at the positions read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lmedit.errors import EditError
from lmedit.hooks import Hooks, ReplayBelow, read_module
from lmedit.methods.base import HParams
from lmedit.methods.value_cache import ValueStore
from lmedit.models.spec import get_module
from lmedit.requests import EditRequest
from lmedit.scoring import Batch, FixedPrefix, encode, token_logprobs, tokenize

CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You")
READ_GROUP = 32  # requests per forward pass when reading keys and states
KL_TEMPLATE = "{} is a"


def context_templates(model: Any, lengths: Sequence[tuple[int, int]] = ((5, 10), (10, 10)), seed: int = 0) -> list[str]:
    """``["{}"]`` plus ``count`` model-written texts of ``length`` tokens per (length, count), each + ``". {}"``.

    Sampled (top-k 5) from the seed words with a fixed seed; cached on the model object.
    """
    key = ("context_templates", tuple(lengths), seed)
    if key in model.cache:
        return model.cache[key]
    from lmedit.continuations import hf_generate_ids

    templates = ["{}"]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for length, count in lengths:
            seeds = [CONTEXT_SEEDS[i % len(CONTEXT_SEEDS)] for i in range(count)]
            rows = hf_generate_ids(model, seeds, length, count, do_sample=True, top_k=5)
            for s, row in zip(seeds, rows):
                text = (s + model.tokenizer.decode(row, skip_special_tokens=True)).replace("{", " ").replace("}", " ")
                templates.append(" ".join(text.split()) + ". {}")
    finally:
        torch.random.set_rng_state(generator_state)
    model.cache[key] = templates
    return templates


def subject_last_token(model: Any, prompt: str, subject_end: int) -> int:
    """Index (in ``prompt``'s own tokens, BOS included) of the token holding character ``subject_end - 1``."""
    text = model.format_prompt(prompt)
    shift = max(0, text.rfind(prompt))  # chat template or in-context facts before the prompt
    _, offsets = tokenize(model, text)
    target = shift + subject_end - 1
    index = None
    for i, (start, end) in enumerate(offsets):
        if start <= target < end:
            index = i
    if index is None:  # offsets may not cover the character (byte-level merges): nearest token before it
        index = max(i for i, (start, end) in enumerate(offsets) if start <= target and end > start)
    return index


@dataclass
class Prompted:
    """A left-padded batch of prefixed prompts (with targets), the subject's last-token position in each
    row, and which request each row belongs to."""

    batch: Batch
    positions: torch.Tensor  # [B] absolute positions in the padded rows
    owner: torch.Tensor  # [B] request index
    is_kl: torch.Tensor  # [B] rows of the KL prompt "{subject} is a"
    is_bare: torch.Tensor  # [B] rows of the request's own prompt (template "{}", no context prefix)


def prefixed_prompts(model: Any, requests: Sequence[EditRequest], templates: Sequence[str],
                     with_targets: bool = True, kl: bool = True) -> Prompted:
    """Every request's prompt under every context template (plus its KL prompt), batched."""
    prompts, targets, positions, owner, is_kl, is_bare = [], [], [], [], [], []
    for r_index, r in enumerate(requests):
        rows = [(t.replace("{}", r.template), False) for t in templates]
        if kl:
            rows.append((KL_TEMPLATE, True))
        for (template, kl_row), bare in zip(rows, [t == "{}" for t in templates] + [False]):
            before = template.index("{}")
            prompt = template.replace("{}", r.subject, 1)
            prompts.append(prompt)
            targets.append(r.target_new if with_targets and not kl_row else None)
            positions.append(subject_last_token(model, prompt, before + len(r.subject)))
            owner.append(r_index)
            is_kl.append(kl_row)
            is_bare.append(bare)
    batch = _encode_mixed(model, prompts, targets)
    width = batch.input_ids.shape[1]
    pads = [width - p - t for p, t in zip(batch.prompt_lengths, batch.target_lengths)]
    device = model.device
    return Prompted(batch, torch.tensor([pad + pos for pad, pos in zip(pads, positions)], device=device),
                    torch.tensor(owner, device=device), torch.tensor(is_kl, device=device),
                    torch.tensor(is_bare, device=device))


def _encode_mixed(model: Any, prompts: list[str], targets: list[str | None]) -> Batch:
    """``encode`` for rows of which some have no target."""
    if all(t is None for t in targets):
        return encode(model, prompts)
    if all(t is not None for t in targets):
        return encode(model, prompts, targets)  # type: ignore[arg-type]
    with_t = encode(model, [p for p, t in zip(prompts, targets) if t is not None], [t for t in targets if t is not None])
    without = encode(model, [p for p, t in zip(prompts, targets) if t is None])
    width = max(with_t.input_ids.shape[1], without.input_ids.shape[1])
    pad = model.tokenizer.pad_token_id

    def left(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    it_t, it_n = iter(range(len(with_t.prompt_lengths))), iter(range(len(without.prompt_lengths)))
    rows, masks, tmask, plen, tlen = [], [], [], [], []
    for t in targets:
        src, i = (with_t, next(it_t)) if t is not None else (without, next(it_n))
        rows.append(left(src.input_ids[i:i + 1], pad))
        masks.append(left(src.attention_mask[i:i + 1], 0))
        tmask.append(left(src.target_mask[i:i + 1].long(), 0).bool())
        plen.append(src.prompt_lengths[i])
        tlen.append(src.target_lengths[i])
    return Batch(torch.cat(rows), torch.cat(masks), torch.cat(tmask), plen, tlen)


@torch.no_grad()
def read_at_subject(model: Any, path: str, where: str, requests: Sequence[EditRequest],
                    templates: Sequence[str], average: bool = True) -> torch.Tensor:
    """The input or output of module ``path`` at each request's subject's last token, averaged over the
    context templates: ``[R, d]`` float32 (``average=False``: one row per request and template, request-major,
    ``[R·T, d]``). The forward pass stops at ``path``; requests run in groups of ``READ_GROUP`` to bound memory."""
    if len(requests) > READ_GROUP:
        return torch.cat([read_at_subject(model, path, where, requests[i:i + READ_GROUP], templates, average)
                          for i in range(0, len(requests), READ_GROUP)])
    prompted = prefixed_prompts(model, requests, templates, with_targets=False, kl=False)
    rows = read_module(model, prompted.batch, path, where)[torch.arange(len(prompted.positions)),  # type: ignore[arg-type]
                                                          prompted.positions].float()
    return _mean_by_owner(rows, prompted.owner, len(requests)) if average else rows


def compute_keys(model: Any, layer: int, requests: Sequence[EditRequest], templates: Sequence[str],
                 average: bool = True) -> torch.Tensor:
    """``k*`` per request: the mean key of ``W_out`` at ``layer`` at the subject's last token, ``[R, d_mlp]``
    (``average=False``: every template's key, ``[R·T, d_mlp]``)."""
    return read_at_subject(model, model.spec.path(layer, "mlp_out"), "input", requests, templates, average)


def _sum_by_owner(rows: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros((n, rows.shape[1]), dtype=rows.dtype, device=rows.device).index_add_(0, owner, rows)


def _mean_by_owner(rows: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    return _sum_by_owner(rows, owner, n) / torch.bincount(owner, minlength=n).clamp(min=1)[:, None].to(rows.dtype)


def _row_weights(prompted: Prompted, share: float | None) -> torch.Tensor:
    """Each target row's weight in its request's NLL (summing to 1 per request; KL rows get 0): uniform,
    or ``share`` for the unprefixed row and ``1 − share`` spread over the prefixed ones (when there are any)."""
    n_req = int(prompted.owner.max()) + 1

    def per_request(mask: torch.Tensor) -> torch.Tensor:  # each row: how many rows of its request are in mask
        return _sum_by_owner(mask[:, None], prompted.owner, n_req)[prompted.owner, 0]

    targets = (~prompted.is_kl).float()
    n_rows = per_request(targets)
    uniform = targets / n_rows
    if share is None:
        return uniform
    n_bare = per_request(prompted.is_bare.float())
    n_ctx = n_rows - n_bare
    split = torch.where(prompted.is_bare, share / n_bare.clamp(min=1), (1 - share) * targets / n_ctx.clamp(min=1))
    return torch.where((n_bare > 0) & (n_ctx > 0), split, uniform)


@dataclass
class ValueConfig:
    """Settings of the v* optimisation, built by ``LocateHParams.value_config`` (which holds the defaults).
    ``group``: requests optimised together in one batch (their deltas are independent and each is frozen
    once its own target passes ``stop_prob``, so grouping changes only speed and memory); ``cache``: keep
    optimised values on disk (``value_cache.ValueStore``), so mass edits resume."""

    lr: float
    steps: int
    kl_factor: float
    weight_decay: float
    clamp_norm_factor: float
    stop_prob: float
    group: int
    cache: bool
    prompt_share: float | None = None


@dataclass
class LocateHParams(HParams):
    """Hyper-parameters shared by the methods that write ``k* → v*`` into ``W_out`` (ROME and the MEMIT
    family); defaults are ROME's published GPT-2 XL settings, which the methods override where theirs differ.

    Attributes:
        lr, steps, kl_factor, weight_decay, clamp_norm_factor, stop_prob: the v* optimisation (``ValueConfig``).
        prompt_share: weight of the request's own prompt (no context prefix) in the NLL, the prefixed
            prompts sharing the rest; ``None``: the uniform mean over all of them (published).
        context_lengths: (tokens, count) of model-written context prefixes (``context_templates``).
        stats_tokens, corpus: the second-moment statistics (see ``lmedit.stats``).
        ridge: conditioning guard of the solves (relative to the mean eigenvalue of ``C``; see ``solvers``).
    """

    lr: float = 0.5
    steps: int = 20
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    stop_prob: float = 0.95
    prompt_share: float | None = None
    context_lengths: tuple = ((5, 10), (10, 10))
    stats_tokens: int = 100_000
    corpus: str | None = None
    ridge: float = 1e-4

    def value_config(self, group: int = 8, cache: bool = False) -> ValueConfig:
        if self.prompt_share is not None and not 0 < self.prompt_share < 1:
            raise EditError(f"prompt_share must be in (0, 1) or None, not {self.prompt_share}")
        return ValueConfig(self.lr, self.steps, self.kl_factor, self.weight_decay, self.clamp_norm_factor,
                           self.stop_prob, group, cache, self.prompt_share)


def optimize_values(model: Any, layer: int, requests: Sequence[EditRequest], templates: Sequence[str],
                    cfg: ValueConfig, sites: Sequence[str] = ("mlp_out",), readout: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Optimise one ``δ`` per request and site (see the module docstring).

    ``sites`` are roles of block ``layer`` whose output receives ``δ`` (``"mlp_out"``: ROME's MLP value;
    ``"block"``: MEMIT's residual stream; ``("attn_out", "mlp_out")``: PMET's joint optimisation). Weight
    decay and the norm clamp apply per site, relative to that site's original output.
    Returns ``(δ [S, R, d], v̄ [S, R, d], info)`` with ``v̄`` the mean original output over the templates
    and ``info`` each request's steps, final NLL and target probability;
    requests are optimised in groups of ``cfg.group``, formed after sorting them by the number of tokens
    from the subject's last token to the end of the target (``_suffix_tokens``): a step runs only the
    positions from the group's earliest subject on (``FixedPrefix``), so groups of like suffixes waste
    fewer (results are returned in the requests' order).

    ``readout`` ([R, d_mlp], one ``u`` per request with ``uᵀk* = 1``) optimises δ *through a rank-one
    update* ``ΔW = δ uᵀ``: the row with key ``k_j`` receives ``δ · uᵀk_j`` instead of ``δ``, which is exactly
    what the written update will add there, so the probabilities reached are the edited model's.
    """
    step = max(1, cfg.group)
    store = ValueStore(model, layer, templates, cfg, sites) if cfg.cache and readout is None else None
    order = sorted(range(len(requests)), key=lambda i: _suffix_tokens(model, requests[i])) if step > 1 \
        else list(range(len(requests)))
    from tqdm.auto import tqdm
    parts = []
    bar = tqdm(total=len(order), unit="request", desc=f"v* at layer {layer}", disable=len(order) <= step)
    for i in range(0, len(order), step):
        members = order[i:i + step]
        saved = {j: store.get(requests[j]) for j in members} if store is not None else {}
        missing = [j for j in members if saved.get(j) is None]
        if missing:
            d, v, got = _optimize_group(model, layer, [requests[j] for j in missing], templates, cfg, sites,
                                        None if readout is None else readout[missing])
            for k, j in enumerate(missing):
                saved[j] = (d[:, k:k + 1].clone(), v[:, k:k + 1].clone(), {key: got[key][k:k + 1] for key in got})
                if store is not None:
                    store.put(requests[j], saved[j])
        parts += [saved[j] for j in members]
        bar.update(len(members))
    bar.close()
    back = torch.tensor(order).argsort()  # sorted position of each request
    nll = [x for p in parts for x in p[2]["nll"]]
    prob = [x for p in parts for x in p[2]["prob"]]
    steps = [x for p in parts for x in p[2]["steps"]]
    info = {"steps": [steps[k] for k in back.tolist()], "nll": [nll[k] for k in back.tolist()],
            "prob": [prob[k] for k in back.tolist()]}
    delta = torch.cat([p[0] for p in parts], dim=1)[:, back.to(parts[0][0].device)]
    v_bar = torch.cat([p[1] for p in parts], dim=1)[:, back.to(parts[0][1].device)]
    return delta, v_bar, info


def _suffix_tokens(model: Any, request: EditRequest) -> int:
    """Tokens from the subject's last token to the end of the target in the bare prompt (the part of a
    row a v* step must run)."""
    prompt = request.prompt
    end = request.template.index("{}") + len(request.subject)
    n_prompt = len(tokenize(model, model.format_prompt(prompt))[0])
    return n_prompt - subject_last_token(model, prompt, end) + len(tokenize(model, " " + request.target_new)[0])


def _optimize_group(model: Any, layer: int, requests: Sequence[EditRequest], templates: Sequence[str],
                    cfg: ValueConfig, sites: Sequence[str], readout: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    prompted = prefixed_prompts(model, requests, templates)
    batch, rows = prompted.batch, torch.arange(len(prompted.positions), device=model.device)
    scale = torch.ones(len(rows), device=model.device)
    if readout is not None:  # each row gets δ·uᵀk_row (see optimize_values)
        path = model.spec.path(layer, "mlp_out")
        with torch.no_grad():
            row_keys = read_module(model, batch, path)[rows, prompted.positions].float()
        scale = (row_keys * readout.to(row_keys)[prompted.owner]).sum(-1)
    n_req = len(requests)
    spec = model.spec
    delta = torch.zeros((len(sites), n_req, spec.hidden_size), dtype=torch.float32, device=model.device,
                        requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=cfg.lr)
    target_rows = ~prompted.is_kl
    n_t = batch.n_target
    tmask = batch.target_mask[:, -n_t:]
    kl_rows = prompted.is_kl
    # the positions whose logits the loss reads: those predicting a target token, and each KL row's own
    reads = torch.zeros_like(batch.target_mask)
    reads[:, -n_t - 1:-1] = tmask
    reads[rows[kl_rows], prompted.positions[kl_rows]] = True
    read_rows = reads.nonzero()[:, 0]
    predicts = ~kl_rows[read_rows]  # which read positions predict a target token (the rest: KL)
    predicting = predicts.nonzero()[:, 0]
    labels = batch.input_ids[:, 1:][reads[:, :-1] & ~kl_rows[:, None]]
    weights = _row_weights(prompted, cfg.prompt_share)[target_rows, None]  # sum to 1 per request
    values: dict[int, torch.Tensor] = {}
    cut = int(prompted.positions.min())  # nothing before the earliest subject position changes
    runner = FixedPrefix(model, batch, cut)
    local = prompted.positions - runner.cut  # positions within the suffix the runner feeds

    def injector(site: int):
        def inject(out: torch.Tensor) -> torch.Tensor:
            if site not in values:
                values[site] = out[rows, local].detach().float()
            add = torch.zeros_like(out, dtype=torch.float32).index_put(
                (rows, local), delta[site, prompted.owner] * scale[:, None])
            return out + add.to(out.dtype)
        return inject

    blocks = get_module(model.module, spec.blocks)
    kl_init = None
    done = torch.zeros(n_req, dtype=torch.bool, device=model.device)  # converged: δ frozen, figures kept
    final = {"steps": [cfg.steps] * n_req, "nll": [0.0] * n_req, "prob": [0.0] * n_req}
    with Hooks(model.module) as hooks, ReplayBelow(blocks, layer), torch.enable_grad():
        for i, site in enumerate(sites):
            hooks.replace(spec.path(layer, site), "output", injector(i))
        for step in range(cfg.steps + 1):
            logits = runner.logits_where(reads)  # [read positions, V]
            token_lp = torch.zeros(tmask.shape, dtype=torch.float32, device=logits.device).index_put(
                (tmask,), token_logprobs(logits[predicting], labels))
            mean_lp = token_lp.sum(1) / tmask.sum(1).clamp(min=1)  # per row
            nll = -_sum_by_owner(weights * mean_lp[target_rows, None], prompted.owner[target_rows], n_req)[:, 0]
            prob = _sum_by_owner(weights * mean_lp[target_rows, None].exp(), prompted.owner[target_rows], n_req)[:, 0]
            kl_logp = torch.log_softmax(logits[~predicts].float(), dim=-1)  # one per KL row, in row order
            if kl_init is None:
                kl_init = kl_logp.detach()
            kl = (kl_init.exp() * (kl_init - kl_logp)).sum(-1)  # KL(P₀ ‖ P_δ), one per request
            v_bar = torch.stack([_mean_by_owner(values[i], prompted.owner, n_req) for i in range(len(sites))])
            decay = (delta.norm(dim=-1) ** 2 / v_bar.norm(dim=-1) ** 2).sum(0)
            loss = (nll + cfg.kl_factor * kl + cfg.weight_decay * decay).sum()
            stopping = ~done & ((prob.detach() > cfg.stop_prob) | (step == cfg.steps))
            for k in stopping.nonzero()[:, 0].tolist():
                final["steps"][k], final["nll"][k], final["prob"][k] = step, round(float(nll[k].detach()), 4), \
                    round(float(prob[k].detach()), 4)
            done |= stopping
            if bool(done.all()):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            held = delta.detach()[:, done].clone()
            optimizer.step()
            with torch.no_grad():  # ‖δ‖ ≤ clamp · ‖v̄‖; converged requests keep their δ
                limit = cfg.clamp_norm_factor * v_bar.norm(dim=-1, keepdim=True)
                norms = delta.norm(dim=-1, keepdim=True)
                delta.mul_(torch.where(norms > limit, limit / norms, torch.ones_like(norms)))
                delta[:, done] = held
    return delta.detach(), v_bar.detach(), final
