"""The sequential (lifelong) protocol: edits accumulate on one model, scored after each edit call or at
checkpoints ``T``; the accumulated edit is checkpointed in ``out_dir/state`` so a killed run resumes.

The checkpoint is one ``Patch`` of ``W_now − W_original`` deltas for every weight any edit changed, the
keys recorded by methods that preserve earlier edits (AlphaEdit) and the adaptors' memories (GRACE's
codebook, WISE's side memories, DEFER's gate), with ``progress.json`` naming how many edit calls it holds
(the patch records the count too, and a resume trusts the patch's). Each checkpoint is written to
``patch.tmp`` and swapped in by renames, so a kill at any instant leaves one whole checkpoint. Whatever
happens, the model leaves ``run_sequential`` exactly as it came in.

Every edit call also appends a line to ``out_dir/edits.jsonl`` (``edit_log_entry``): the call's index, its
cases, its seconds and what the method reports of its training (steps, final loss, NLL, WISE's routing
activations, DEFER's gate lr, v*'s probability, …), so a run shows how each edit converged and where the time
went, not only how the accumulated edits scored. A resume drops the lines of calls after its checkpoint
(they are made again).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

from lmedit.adaptors import adaptors
from lmedit.adaptors import restore as restore_adaptors
from lmedit.adaptors import snapshot as snapshot_adaptors
from lmedit.errors import EvalError
from lmedit.patch import EditedKeys, Patch, WeightDelta, edited_keys, weight_plus_delta

if TYPE_CHECKING:
    from lmedit.evaluate.runner import _Run

CHECKPOINT_SECONDS = 300.0
"""Sequential runs checkpoint their edit state at every scoring mark, every 10 edit calls, and whenever
this long has passed since the last checkpoint (a batch of 100 MEMIT edits takes minutes)."""


def chunks(indices: Iterable[int], size: int) -> list[list[int]]:
    """``indices`` in consecutive groups of ``size`` (the last may be shorter): one edit call each."""
    items = list(indices)
    size = max(1, size)
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_sequential(run: "_Run", editor: Any, ids: list[str], baseline: Any, batch_size: int, scoring: str,
                   checkpoints: list[int], bar: Any) -> list[float]:
    """Accumulate edits; score after each or at the checkpoints; checkpoint the edit state for resume.
    Returns the wall time per edited case of this part of the run."""
    model, requests, out = run.model, run.requests, run.out_dir
    total = len(requests)
    marks = [t for t in checkpoints if t < total] + [total]
    calls = chunks(range(total), batch_size)
    state_dir = out / "state" if out is not None else None
    originals: dict[str, torch.Tensor] = {}
    keys_before = list(model.cache.get("edited_keys", []))  # restored at the end, like the weights
    adaptors_before = snapshot_adaptors(model)
    done_chunks = 0
    progress = read_progress(state_dir) if state_dir is not None else None
    if state_dir is not None and progress is not None:
        if not (state_dir / "patch").exists() and (state_dir / "patch.old").exists():
            (state_dir / "patch.old").rename(state_dir / "patch")  # killed mid-swap: the previous checkpoint
        saved = Patch.load(state_dir / "patch")
        # the patch's own count: a kill between its swap and the progress file leaves it one checkpoint ahead
        done_chunks = int(saved.info.get("chunks_done", progress["chunks_done"]))
        run.failed.update({int(i): why for i, why in progress.get("failed", {}).items()})
        _remember(model, saved, originals)
        saved.apply(model).commit()
        _truncate_edit_log(out, done_chunks)
        bar.update(min(total, done_chunks * batch_size))
        bar.refresh()  # show the resumed position now, not after the next edit
    if out is not None and done_chunks == 0:
        (out / EDIT_LOG).unlink(missing_ok=True)
    edit_seconds: list[float] = []
    last_checkpoint = time.perf_counter()
    try:
        for c, chunk in enumerate(calls):
            if c < done_chunks:
                continue
            patch, seconds = run.try_edit(editor, chunk)
            edit_seconds += [seconds] * len(chunk)
            if out is not None:
                with open(out / EDIT_LOG, "a") as f:
                    f.write(json.dumps(edit_log_entry(c, [ids[i] for i in chunk], seconds * len(chunk), patch)) + "\n")
            if patch is not None:  # a declined edit leaves the accumulated model as it was
                _remember(model, patch, originals)
                patch.apply(model).commit()
            edited = chunk[-1] + 1
            if scoring == "after_each":
                run.score(chunk, baseline, {"T": edited, "edit_seconds": seconds})
            elif edited in marks:
                todo = [i for i in range(edited) if (ids[i], edited) not in run.done]
                run.score(todo, baseline, {"T": edited})
            bar.update(len(chunk))
            if state_dir is not None and (edited in marks or c % 10 == 9
                                          or time.perf_counter() - last_checkpoint > CHECKPOINT_SECONDS):
                _checkpoint(model, originals, state_dir, c + 1, editor.name, run.failed)
                last_checkpoint = time.perf_counter()
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                model.parameter(name).copy_(original)
        model.cache["edited_keys"] = keys_before
        restore_adaptors(model, adaptors_before)
    return edit_seconds


def read_progress(state_dir: Path) -> dict[str, Any] | None:
    """A run's checkpoint record (``chunks_done``: edit calls its state holds; ``failed``), if it has one."""
    path = state_dir / "progress.json"
    return json.loads(path.read_text()) if path.is_file() else None


EDIT_LOG = "edits.jsonl"
INFO_LIMIT = 2000
"""Characters of JSON an ``info`` entry may take in the edit log (per-case lists of a 100-edit batch fit;
anything larger, such as a tensor's worth of numbers, is left out)."""


def edit_log_entry(call: int, case_ids: list[str], seconds: float, patch: Patch | None) -> dict[str, Any]:
    """One line of ``edits.jsonl``: ``{"call", "cases", "seconds", "declined", "info": {...}}`` where ``info``
    holds the patch's ``info`` entries that are plain JSON of at most ``INFO_LIMIT`` characters."""
    info: dict[str, Any] = {}
    for key, value in (patch.info.items() if patch is not None else ()):
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            continue
        if len(text) <= INFO_LIMIT:
            info[key] = value
    return {"call": call, "cases": case_ids, "seconds": round(seconds, 3), "declined": patch is None, "info": info}


def read_edit_log(directory: str | Path) -> list[dict[str, Any]]:
    """The entries of ``directory/edits.jsonl`` (none when it has no log); a line cut short by a kill, or
    anything else that is not an entry, is skipped."""
    path = Path(directory) / EDIT_LOG
    entries = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("call"), int):
            entries.append(entry)
    return entries


def _truncate_edit_log(out: Path | None, calls_done: int) -> None:
    """Keep the edit log's entries of the first ``calls_done`` calls (a resume makes the later ones again; a
    line cut short by a kill is dropped with them)."""
    if out is None or not (out / EDIT_LOG).exists():
        return
    kept = [entry for entry in read_edit_log(out) if entry["call"] < calls_done]
    tmp = out / (EDIT_LOG + ".tmp")
    tmp.write_text("".join(json.dumps(entry) + "\n" for entry in kept))
    tmp.replace(out / EDIT_LOG)


def _remember(model: Any, patch: Patch, originals: dict[str, torch.Tensor]) -> None:
    """Snapshot (once) every parameter a patch will change, so the run can restore the model."""
    for component in patch.components:
        if component.memory:
            continue  # no weight: recorded keys or adaptor entries (see _checkpoint)
        if not isinstance(component, WeightDelta):
            raise EvalError(f"sequential runs support weight patches only (got {type(component).__name__})")
        if component.param not in originals:
            originals[component.param] = model.parameter(component.param).detach().clone()


def _checkpoint(model: Any, originals: dict[str, torch.Tensor], state_dir: Path, chunks_done: int, method: str,
                failed: dict[int, str]) -> None:
    """Save the accumulated edit as one patch of ``W_now − W_original`` deltas, then the progress mark.

    The live weights are then snapped to ``W_original + Δ`` with the arithmetic a resume applies
    (``patch.weight_plus_delta``): ``W₀ + Σ dᵢ`` accumulated edit by edit and ``W₀ + (W − W₀)`` differ by
    rounding, so without the snap a resumed run would drift from an uninterrupted one, and caches keyed on
    the exact weights (the value store's v*) would miss after every resume."""
    deltas: list[Any] = []
    with torch.no_grad():
        for name, original in originals.items():
            live = model.parameter(name)
            delta = live.detach().float() - original.float()
            live.copy_(weight_plus_delta(original, delta))
            deltas.append(WeightDelta(name, delta.cpu()))
    params = dict.fromkeys(c.param for c in model.cache.get("edited_keys", []))
    deltas += [EditedKeys(param, edited_keys(model, param)) for param in params]  # type: ignore[arg-type]
    deltas += [adaptor.as_component() for adaptor in adaptors(model).values()]
    # written whole, then swapped in by renames, so a kill at any instant leaves one complete checkpoint
    fresh, current, old = state_dir / "patch.tmp", state_dir / "patch", state_dir / "patch.old"
    for stale in (fresh, old):
        if stale.exists():
            shutil.rmtree(stale)
    Patch(method, {}, [], model.fingerprint, deltas, {"chunks_done": chunks_done}).save(fresh)
    if current.exists():
        current.rename(old)
    fresh.rename(current)
    shutil.rmtree(old, ignore_errors=True)
    tmp = state_dir / "progress.json.tmp"
    tmp.write_text(json.dumps({"chunks_done": chunks_done, "failed": failed}))
    tmp.replace(state_dir / "progress.json")
