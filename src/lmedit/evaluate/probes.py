"""Batched scoring of every probe of many edit cases, and per-case metric records.

All probes of all cases being scored are flattened into one list of ``ProbeItem``s, sorted by length
and run through the model in large batches: one teacher-forced pass for the answers (plus one for the
competing answers of the probability comparison) and one batched greedy generation. The unedited
model's locality predictions are computed once per (model fingerprint, probe set) and cached on disk.

Locality items are scored apart from the others, and on a half-precision model one at a time, in the
baseline and after an edit alike: batched, a prompt's logits depend on its batchmates (padding and batch
shape change how the matrix products round), and in bfloat16 that alone changes greedy continuations — an
unedited tiny Llama in bfloat16 scored Loc.(gen) 0.88 against itself over 40 mixed-length cases, and a
WISE run on SmolLM2 in bfloat16 lost 7 of 100 locality continuations whose prompts no side memory answered.
Scored alone, an input the edit does not touch gives bit-identical logits before and after it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any, Sequence

import torch

from lmedit.evaluate.metrics import generation_matches, ngram_entropy, prob_success, tfidf_cosine, token_agreement
from lmedit.requests import EditRequest
from lmedit.continuations import generate, score_prompts
from lmedit.scoring import encode

KINDS = ("rewrite", "rephrase", "locality", "portability")
BATCH_SIZE = 64  # prompts per scoring batch


@dataclass(frozen=True)
class ProbeItem:
    """One (prompt, answer) to score for case ``case``; ``alt`` is the competing answer, if any."""

    case: int
    kind: str
    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()
    group: str | None = None
    alt: str | None = None


@dataclass
class ItemScore:
    token_ids: list[int]
    argmax_ids: list[int]
    mean_logprob: float
    token_accuracy: float
    alt_mean_logprob: float | None = None
    generated: str | None = None
    generated_ids: list[int] | None = None


def probe_items(requests: Sequence[EditRequest]) -> list[ProbeItem]:
    """The probes of each request: its prompt, rephrases, locality and portability probes."""
    items: list[ProbeItem] = []
    for i, r in enumerate(requests):
        items.append(ProbeItem(i, "rewrite", r.prompt, r.target_new, alt=r.target_true))
        items += [ProbeItem(i, "rephrase", p, r.target_new, alt=r.target_true) for p in r.rephrases]
        items += [ProbeItem(i, "locality", p.prompt, p.answer, p.aliases, p.group,
                            alt=r.target_new if p.group == "neighborhood" else None) for p in r.locality]
        items += [ProbeItem(i, "portability", p.prompt, p.answer, p.aliases, p.group) for p in r.portability]
    return items


def score_items(model: Any, items: Sequence[ProbeItem], *, generation: bool = True, probability: bool = True,
                batch_size: int = BATCH_SIZE, max_new_tokens: int = 24) -> list[ItemScore]:
    """Teacher-forced scores of each item's answer (and competing answer) and its greedy continuation.

    One ``score_prompts`` call: each prompt runs once, whatever is scored or generated after it.
    Generation runs for as many tokens as the longest accepted answer has, plus 2 to see the word end.
    """
    targets = [[it.answer] + ([it.alt] if probability and it.alt else []) for it in items]
    need = [0] * len(items)
    if generation:
        need = [min(max_new_tokens, 2 + max(_n_tokens(model, it.prompt, a) for a in (it.answer, *it.aliases)))
                for it in items]
    results = score_prompts(model, [it.prompt for it in items], targets, need, batch_size)
    scores = []
    for it, r in zip(items, results):
        main = r.continuations[0]
        scores.append(ItemScore(main.token_ids, main.argmax_ids, main.mean_logprob, main.token_accuracy,
                                r.continuations[1].mean_logprob if len(r.continuations) > 1 else None,
                                model.tokenizer.decode(r.generated_ids, skip_special_tokens=True) if generation else None,
                                r.generated_ids if generation else None))
    return scores


def locality_batch_size(model: Any) -> int:
    """Locality items per scoring batch: 1 on a half-precision (bfloat16/float16) model, where batching
    changes a prompt's greedy continuation by rounding alone (module docstring), else ``BATCH_SIZE`` (in
    float32 the batch-dependent differences are ~1e-7 relative and did not flip a token in any run here)."""
    return 1 if model.dtype in (torch.bfloat16, torch.float16) else BATCH_SIZE


def score_probes(model: Any, items: Sequence[ProbeItem], *, generation: bool = True) -> list[ItemScore]:
    """``score_items`` with the locality items scored apart, in batches of ``locality_batch_size``, the
    way ``locality_baseline`` scores them, so an item the edit does not touch scores as in the baseline."""
    out: list[ItemScore | None] = [None] * len(items)
    local = [i for i, it in enumerate(items) if it.kind == "locality"]
    others = [i for i, it in enumerate(items) if it.kind != "locality"]
    for idx, batch_size in ((others, BATCH_SIZE), (local, locality_batch_size(model))):
        if idx:
            scores = score_items(model, [items[i] for i in idx], generation=generation, batch_size=batch_size)
            for i, score in zip(idx, scores):
                out[i] = score
    return out  # type: ignore[return-value]


def _n_tokens(model: Any, prompt: str, answer: str) -> int:
    return encode(model, [prompt], [answer]).target_lengths[0]


# ------------------------------------------------------------------------------------- baseline
Baseline = dict[tuple[str, str, str | None], ItemScore]  # (prompt, answer, competing answer) -> score


def baseline_key(item: ProbeItem) -> tuple[str, str, str | None]:
    """An item's key in a ``Baseline``: the competing answer is part of it, since it is scored in the same
    batch as the answer (a neighbourhood prompt is scored against its case's new target)."""
    return item.prompt, item.answer, item.alt


def locality_baseline(model: Any, items: Sequence[ProbeItem], cache: Path | None = None) -> Baseline:
    """The *unedited* model's scores on the locality items, keyed by (prompt, answer).

    Must run before any patch is applied. Cached as JSON under ``cache`` keyed by the model fingerprint,
    its dtype and device type (the fingerprint is the same in every dtype, the rounding is not) and a hash
    of the probes, so a dataset's baseline is computed once per model and placement.
    """
    loc = list({baseline_key(it): it for it in items if it.kind == "locality"}.values())
    batch_size = locality_batch_size(model)
    setting = [getattr(model, "doc_start", None), model.chat, batch_size, str(model.dtype), model.device.type]
    key = hashlib.sha256(json.dumps([list(baseline_key(it)) for it in loc] + setting).encode()).hexdigest()[:20]
    path = cache / model.fingerprint[:16] / f"locality-{key}.json" if cache else None
    if path is not None and path.exists():
        scores = [ItemScore(**d) for d in json.loads(path.read_text())]
    else:
        if model.applied:
            raise RuntimeError("the locality baseline must be computed on the unedited model (a patch is applied)")
        scores = score_items(model, loc, batch_size=batch_size)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps([s.__dict__ for s in scores]))
            tmp.replace(path)
    return {baseline_key(it): s for it, s in zip(loc, scores)}


# ------------------------------------------------------------------------------------- records
def case_records(requests: Sequence[EditRequest], items: Sequence[ProbeItem], scores: Sequence[ItemScore],
                 baseline: Baseline | None) -> list[dict[str, Any]]:
    """Per-case metric records from scored items (see ``metrics`` for the definitions).

    Keys: ``rewrite_tf/_em`` (reliability), ``rephrase_tf/_em`` (generalisation), ``locality_tf/_em``
    (agreement with the unedited model), ``locality_acc`` (accuracy against the dataset's answers),
    ``portability_tf/_em`` and per-group ``portability[G]_tf``; with ``target_true``: ``efficacy``,
    ``efficacy_mag``, ``paraphrase``, ``neighborhood`` (probability comparisons); ``rewrite_ppl``.
    """
    per_case: dict[int, dict[str, list[float]]] = {i: {} for i in range(len(requests))}

    def add(case: int, key: str, value: float | None) -> None:
        if value is not None:
            per_case[case].setdefault(key, []).append(float(value))

    for it, s in zip(items, scores):
        answers = (it.answer, *it.aliases)
        em = None if s.generated is None else generation_matches(s.generated, answers)
        c = it.case
        if it.kind in ("rewrite", "rephrase"):
            add(c, f"{it.kind}_tf", s.token_accuracy)
            add(c, f"{it.kind}_em", em)
            if s.alt_mean_logprob is not None:
                ok, mag = prob_success(s.mean_logprob, s.alt_mean_logprob)
                add(c, "efficacy" if it.kind == "rewrite" else "paraphrase", ok)
                if it.kind == "rewrite":
                    add(c, "efficacy_mag", mag)
            if it.kind == "rewrite":
                add(c, "rewrite_ppl", math.exp(-s.mean_logprob))
        elif it.kind == "locality":
            add(c, "locality_acc", s.token_accuracy)
            base = (baseline or {}).get(baseline_key(it))
            if base is not None:
                add(c, "locality_tf", token_agreement(s.argmax_ids, base.argmax_ids))
                if s.generated_ids is not None and base.generated_ids is not None:
                    add(c, "locality_em", s.generated_ids == base.generated_ids)
            if s.alt_mean_logprob is not None:  # neighbourhood: the old answer must still win
                add(c, "neighborhood", s.mean_logprob > s.alt_mean_logprob)
        else:
            add(c, "portability_tf", s.token_accuracy)
            add(c, "portability_em", em)
            if it.group:
                add(c, f"portability[{it.group}]_tf", s.token_accuracy)
    records = []
    for i, r in enumerate(requests):
        rec: dict[str, Any] = {"case_id": r.case_id if r.case_id is not None else str(i)}
        rec.update({k: mean(v) for k, v in per_case[i].items()})
        records.append(rec)
    return records


def fluency_records(model: Any, requests: Sequence[EditRequest], max_new_tokens: int = 100) -> list[dict[str, float]]:
    """ROME's generation metrics per case, from free greedy generations after its ``generation_prompts``.

    ``fluency``: mean weighted bi/tri-gram entropy of the generations; ``consistency``: TF-IDF cosine
    between the generations and the case's ``meta["reference_texts"]`` (when the dataset has them).
    Cases without generation prompts get an empty record.
    """
    prompts = [p for r in requests for p in r.generation_prompts]
    texts = iter(generate(model, prompts, max_new_tokens=max_new_tokens) if prompts else [])
    out: list[dict[str, float]] = []
    for r in requests:
        gens = [next(texts) for _ in r.generation_prompts]
        rec: dict[str, float] = {}
        if gens:
            rec["fluency"] = mean(ngram_entropy(g) for g in gens)
            refs = r.meta.get("reference_texts") if isinstance(r.meta, dict) else None
            if refs:
                rec["consistency"] = tfidf_cosine(" ".join(gens), refs)
        out.append(rec)
    return out
