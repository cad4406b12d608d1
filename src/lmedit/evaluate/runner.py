"""Evaluation runs: protocols, streaming per-case records, resume, summaries.

Protocols (recorded in every report):

* ``single``: each case is edited on the clean model, scored, and reverted with ``Patch.revert()``.
* ``batch``: ``batch_size`` cases are edited in one call, scored, reverted.
* ``sequential``: edits accumulate (``batch_size`` cases per edit call, 1 by default). ``scoring``
  ``after_each`` scores a case right after its own edit; ``after_all`` scores every case edited so far
  at each checkpoint ``T`` in ``checkpoints`` (and at the end) — the lifelong setting.
* ``method=None`` evaluates the unedited model (the baseline every method is compared with).

``shuffle=True`` edits the same first ``n`` cases in an order drawn from ``seed`` (recorded as ``order``):
a dataset file in which related cases sit next to each other (ZsRE: 228 of its first 1,000 neighbours share
a subject) otherwise gives a lifelong run those neighbours in one stretch.

A method that declines a request (an ``EditError``: KN finding no neurons, AlphaEdit finding no null
space …) leaves the model unchanged; the run goes on, and the case is scored on the model as it is
(unedited in ``single``/``batch``) with ``edit_failed = 1`` and the message in ``edit_error``, so the
summary's ``edit_failed`` is the failure rate and the other means count a declined edit as the miss
it is.

Per-case records stream to ``out_dir/cases.jsonl``; a killed run continues with ``resume=True``
(sequential runs also checkpoint their accumulated edit in ``out_dir/state``, see
``lmedit.evaluate.sequential``) under the settings recorded in ``out_dir/run.json`` when it started, or not
at all (``lmedit.evaluate.run_files.record_settings``). ``summary.json`` and
``summary.md`` hold the means and everything needed to reproduce the run.
"""
from __future__ import annotations

import json
import logging
import math
import platform
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any, Iterable, Sequence

import torch

from lmedit.errors import EditError, EvalError
from lmedit.evaluate.multihop import multihop_record
from lmedit.evaluate.probes import case_records, fluency_records, locality_baseline, probe_items, score_probes
from lmedit.evaluate.run_files import edit_requests, read_cases, record_settings
from lmedit.evaluate.sequential import chunks, run_sequential
from lmedit.models.bundled import cache_dir
from lmedit.patch import Patch
from lmedit.requests import EditRequest

log = logging.getLogger(__name__)
PROTOCOLS = ("single", "batch", "sequential")
SCORINGS = ("after_each", "after_all")


@dataclass
class Report:
    """The result of ``evaluate``: configuration, per-case records and their summary."""

    config: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    out_dir: Path | None = None

    def table(self) -> str:
        from lmedit.evaluate.report import markdown_table

        return markdown_table([self])


@dataclass
class _Run:
    model: Any
    requests: list[EditRequest]
    out_dir: Path | None
    generation: bool
    fluency: bool = False
    done: set[tuple[str, int | None]] = field(default_factory=set)
    records: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # case index -> why its edit was declined

    def score(self, cases: Sequence[int], baseline: Any, extra: dict[str, Any],
              per_case: Sequence[dict[str, Any]] | None = None) -> None:
        reqs = [self.requests[i] for i in cases]
        items = probe_items(reqs)
        scores = score_probes(self.model, items, generation=self.generation)
        records = case_records(reqs, items, scores, baseline)
        fluent = fluency_records(self.model, reqs) if self.fluency else [{} for _ in reqs]
        for j, (i, rec, flu) in enumerate(zip(cases, records, fluent)):
            outcome = {"edit_failed": 1.0, "edit_error": self.failed[i]} if i in self.failed else {"edit_failed": 0.0}
            self.write({**rec, **flu, **extra, **(per_case[j] if per_case else {}), **outcome})

    def try_edit(self, editor: Any, chunk: Sequence[int]) -> tuple[Patch | None, float]:
        """``editor.edit`` on the chunk's requests — ``None`` (recorded in ``failed``) if it declines — and
        the wall time per edited case."""
        start = time.perf_counter()
        try:
            patch = editor.edit(self.model, [self.requests[i] for i in chunk])
        except EditError as error:
            log.warning("edit of cases %s declined: %s", [self.requests[i].case_id for i in chunk], error)
            self.failed.update({i: str(error) for i in chunk})
            patch = None
        return patch, (time.perf_counter() - start) / len(chunk)

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.done.add((record["case_id"], record.get("T")))
        if self.out_dir is not None:
            with open(self.out_dir / "cases.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


DIAGNOSTICS = ("v_prob", "v_steps", "timing")
"""Entries of a patch's ``info`` copied into each case record (prefixed ``edit_``): the target
probability v* reached and its steps (locate-then-edit), and the time split of the edit."""


def edit_diagnostics(patch: Patch | None, n: int) -> list[dict[str, Any]]:
    """Per case of an ``n``-case edit call, the ``DIAGNOSTICS`` its patch reports: a list with one entry
    per case is split between them, anything else (a timing dict, per-group steps) is given to each."""
    if patch is None:
        return [{} for _ in range(n)]
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for key in DIAGNOSTICS:
        value = patch.info.get(key)
        if value is None:
            continue
        for j, row in enumerate(rows):
            row[f"edit_{key}"] = value[j] if isinstance(value, list) and len(value) == n else value
    return rows


def evaluate(model: Any, method: str | Any | None, data: Any, *, protocol: str = "single", n: int | None = None,
             batch_size: int = 1, scoring: str = "after_all", checkpoints: Iterable[int] = (1, 10, 100, 1000),
             hparams: dict[str, Any] | None = None, out_dir: str | Path | None = None, resume: bool = False,
             generation: bool = True, fluency: bool = False, seed: int = 0, shuffle: bool = False,
             progress: bool = True) -> Report:
    """Edit and score the cases of ``data`` under ``protocol``; see the module docstring.

    Args:
        model: a loaded ``lmedit.Model`` with no patch applied.
        method: a method name (``"ft-m"``), a ``Method`` instance, or ``None`` for the unedited model
            (all cases scored together; ``"none"`` instead runs the empty edit through the protocol).
        data: a dataset name or path (see ``lmedit.data.load_dataset``), a ``Dataset``, or ``EditRequest``s.
        n: use the first ``n`` cases.  batch_size: cases per edit call (batch and sequential protocols).
        scoring: ``after_each`` or ``after_all`` (sequential).  checkpoints: the T at which ``after_all`` scores.
        out_dir: where ``cases.jsonl``, ``summary.json``, ``summary.md`` (and plots) go.
        resume: continue a killed run in ``out_dir``.  generation: also compute the generation metrics.
        fluency: also generate 100 tokens after each case's generation prompts (fluency, consistency).
        shuffle: edit (and number T) the first ``n`` cases in an order drawn from ``seed``, not the file's.

    Multi-hop datasets (MQuAKE) are scored per case by ``multihop.multihop_record``.
    """
    from tqdm.auto import tqdm

    from lmedit.methods import get_method

    if protocol not in PROTOCOLS:
        raise EvalError(f"unknown protocol {protocol!r}; accepted: {', '.join(PROTOCOLS)}")
    if scoring not in SCORINGS:
        raise EvalError(f"unknown scoring {scoring!r}; accepted: {', '.join(SCORINGS)}")
    if model.applied:
        raise EvalError("evaluate() needs the unedited model: revert the applied patches first")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise EvalError(f"n, the number of cases, must be at least 1, not {n!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvalError(f"the batch size must be at least 1, not {batch_size!r}")
    dataset, requests = edit_requests(data, n, shuffle, seed)
    if not requests:
        raise EvalError("no edit cases to evaluate")
    editor = None if method is None else (get_method(method, **(hparams or {})) if isinstance(method, str) else method)
    torch.manual_seed(seed)
    out = Path(out_dir) if out_dir is not None else None
    run = _Run(model, requests, out, generation, fluency)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        cases_file = out / "cases.jsonl"
        if cases_file.exists() and cases_file.stat().st_size and not resume:
            raise EvalError(f"{out} already holds results; pass resume=True (--resume) or choose another directory")
        if resume:
            run.records = read_cases(out, repair=True)
            run.done.update((r["case_id"], r.get("T")) for r in run.records)
    config = {
        "protocol": protocol if editor is not None else "unedited",
        "scoring": scoring if protocol == "sequential" else None,
        "batch_size": batch_size, "n": len(requests), "seed": seed, "order": "shuffled" if shuffle else "file",
        "method": editor.name if editor is not None else "none",
        "hparams": editor.hparams.resolve(model).to_dict() if editor is not None else {},
        "model": {"name": model.name, "fingerprint": model.fingerprint, "architecture": type(model.module).__name__,
                  "dtype": str(model.dtype), "device": str(model.device), "chat": model.chat,
                  "doc_start_token": model.doc_start},
        "dataset": dataset.describe() if dataset is not None else {"name": "requests", "n": len(requests)},
        "generation_metrics": generation, "fluency_metrics": fluency,
        "lmedit_version": _version(), "torch": torch.__version__, "python": platform.python_version(),
    }
    if out is not None:
        record_settings(out, config, resume)
    start = time.perf_counter()
    cases = list(getattr(dataset, "cases", None) or [])[:n] if dataset is not None else []
    if cases:
        config["protocol"] = "multihop"
        for case in tqdm(cases, desc="multi-hop", disable=not progress):
            if (str(case.case_id), None) not in run.done:
                run.write(multihop_record(model, editor, case))
        return _finish(run, config, start, [], by_t=False)
    baseline = locality_baseline(model, probe_items(requests), cache_dir() / "eval")
    ids = [r.case_id if r.case_id is not None else str(i) for i, r in enumerate(requests)]
    bar = tqdm(total=len(requests), desc=f"{config['method']} {config['protocol']}", disable=not progress)
    edit_seconds: list[float] = []
    try:
        if editor is None:
            todo = [i for i in range(len(requests)) if (ids[i], None) not in run.done]
            bar.update(len(requests) - len(todo))
            for start_i in range(0, len(todo), 256):
                chunk = todo[start_i:start_i + 256]
                run.score(chunk, baseline, {})
                bar.update(len(chunk))
        elif protocol in ("single", "batch"):
            size = 1 if protocol == "single" else batch_size
            for chunk in chunks(range(len(requests)), size):
                if all((ids[i], None) in run.done for i in chunk):
                    bar.update(len(chunk))
                    continue
                patch, seconds = run.try_edit(editor, chunk)
                edit_seconds += [seconds] * len(chunk)
                with patch.applied(model) if patch is not None else nullcontext():  # declined: the model as it is
                    run.score(chunk, baseline, {"edit_seconds": seconds}, edit_diagnostics(patch, len(chunk)))
                bar.update(len(chunk))
        else:
            edit_seconds = run_sequential(run, editor, ids, baseline, batch_size, scoring, sorted(set(checkpoints)),
                                          bar)
    finally:
        bar.close()
    return _finish(run, config, start, edit_seconds,
                   by_t=protocol == "sequential" and scoring == "after_all" and editor is not None)


def _finish(run: _Run, config: dict[str, Any], start: float, edit_seconds: list[float], by_t: bool) -> Report:
    config.update(wall_seconds=round(time.perf_counter() - start, 2), peak_memory_mb=_peak_memory_mb(run.model),
                  edit_seconds_mean=round(mean(edit_seconds), 4) if edit_seconds else None)
    report = Report(config, run.records, summarize(run.records, by_t=by_t), run.out_dir)
    if run.out_dir is not None:
        _write_outputs(report)
    return report


def summarize(records: Sequence[dict[str, Any]], by_t: bool = False) -> dict[str, Any]:
    """Means of every numeric metric over cases (perplexities: geometric means); with ``by_t`` (sequential ``after_all``) also per ``T``.

    ``overall`` is then the last checkpoint (all edits made).
    """
    def average(key: str, values: list[float]) -> float:
        if key.endswith("_ppl"):  # geometric mean = exp(mean NLL): one broken case cannot swamp the rest
            return math.exp(mean(math.log(max(v, 1e-300)) for v in values)) if all(math.isfinite(v) for v in values) \
                else math.inf
        return mean(values)

    def means(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
        keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k != "T"})
        return {k: round(average(k, [r[k] for r in rows if k in r]), 4) for k in keys} | {"cases": len(rows)}

    if not by_t or not records:
        return {"overall": means(records)} if records else {"overall": {"cases": 0}}
    groups: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(int(r["T"]), []).append(r)
    return {"overall": means(groups[max(groups)]), "by_T": {t: means(rows) for t, rows in sorted(groups.items())}}


def _peak_memory_mb(model: Any) -> float:
    if model.device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(model.device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _version() -> str:
    import lmedit

    return lmedit.__version__


def resummarize(directory: str | Path) -> Report:
    """Recompute a finished run's summary (and table, curves) from its ``cases.jsonl`` with the current
    averaging rules; its configuration is kept as recorded."""
    from lmedit.evaluate.report import load_report

    recorded = load_report(directory)
    records = read_cases(directory)
    report = Report(recorded.config, records, summarize(records, by_t="by_T" in recorded.summary), Path(directory))
    _write_outputs(report)
    return report


def _write_outputs(report: Report) -> None:
    from lmedit.evaluate.report import markdown_table, plot_curves

    out = report.out_dir
    assert out is not None
    (out / "summary.json").write_text(json.dumps({"config": report.config, "summary": report.summary}, indent=2))
    (out / "summary.md").write_text(markdown_table([report]) + "\n")
    if "by_T" in report.summary:
        plot_curves(report, out / "curves.png")
