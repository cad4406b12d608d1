"""What a run directory holds, and what a run edits.

A run directory (``evaluate(..., out_dir=...)``) holds ``run.json`` (the settings it started under, written by
``record_settings``), ``cases.jsonl`` (one record per scored case, read back by ``read_cases``) and, when it
has finished, ``summary.json``/``summary.md``. ``edit_requests`` gives the cases a run on a dataset edits, in
its order; ``run_requests`` rebuilds them from a run's ``run.json``.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from lmedit.errors import EvalError
from lmedit.requests import EditRequest

log = logging.getLogger(__name__)

# What a resumed run must share with the part before it (hyper-parameters: those both parts know), and
# what may differ but is worth a warning (a run continued on another machine).
SAME_SETTINGS = ("protocol", "scoring", "batch_size", "seed", "order", "method", "model.name", "model.fingerprint",
                 "model.chat", "model.doc_start_token", "dataset.sha256", "generation_metrics", "fluency_metrics")
WARN_SETTINGS = ("model.device", "model.dtype", "lmedit_version", "torch")


def record_settings(out: Path, config: dict[str, Any], resume: bool) -> None:
    """Record the run's settings in ``out/run.json``; on resume, refuse to continue under other ones.

    A run is one table row: continuing it with another learning rate, model or dataset file would mix two
    experiments under one name. ``n`` may grow (extending a run; not a shuffled one, whose order depends on
    it; ``run.json`` then records the new ``n`` and the shorter run's summary is removed, so ``lmedit report``
    shows the run as in progress until it ends) but never shrink (records and edit state may reach past it);
    the device, dtype and library versions may change with a warning (``runs/README.md`` records such mixed
    runs), and so may a hyper-parameter the method gained after the run started (pin it with ``--hparam``).
    """
    path = out / "run.json"
    if resume and path.exists():
        earlier = json.loads(path.read_text())

        def get(c: dict[str, Any], dotted: str) -> Any:
            for part in dotted.split("."):
                c = c.get(part) if isinstance(c, dict) else None
            return "file" if c is None and dotted == "order" else c  # runs from before ``order`` was recorded

        def text(value: Any) -> str:
            return json.dumps(value, sort_keys=True, default=str)

        changed = [f"{k}: {get(earlier, k)!r} -> {get(config, k)!r}" for k in SAME_SETTINGS
                   if text(get(earlier, k)) != text(get(config, k))]
        if get(config, "order") == "shuffled" and get(earlier, "n") != get(config, "n"):  # another n, another order
            changed.append(f"n of a shuffled run: {get(earlier, 'n')!r} -> {get(config, 'n')!r}")
        elif (get(config, "n") or 0) < (get(earlier, "n") or 0):  # its records and edit state reach past the new n
            changed.append(f"n may grow, not shrink: {get(earlier, 'n')!r} -> {get(config, 'n')!r}")
        hp_old, hp_new = earlier.get("hparams", {}), config.get("hparams", {})
        changed += [f"hparams.{k}: {hp_old[k]!r} -> {hp_new[k]!r}" for k in sorted(set(hp_old) & set(hp_new))
                    if text(hp_old[k]) != text(hp_new[k])]
        if changed:
            raise EvalError(f"{out} was run with other settings; resuming would mix two experiments "
                            f"({'; '.join(changed)}). Use another output directory.")
        moved = [f"{k} {get(earlier, k)} -> {get(config, k)}" for k in WARN_SETTINGS
                 if text(get(earlier, k)) != text(get(config, k))]
        # a hyper-parameter the method gained since the run started: its earlier edits ran without it
        moved += [f"new hparams.{k} = {hp_new[k]!r}" for k in sorted(set(hp_new) - set(hp_old))]
        if moved:
            log.warning("%s: resuming on another placement or version (%s)", out, "; ".join(moved))
        if get(config, "n") != get(earlier, "n"):  # extended: the run is under way again, to the new n
            earlier["n"] = config["n"]
            earlier.setdefault("dataset", {})["n"] = get(config, "dataset.n")
            path.write_text(json.dumps(earlier, indent=2, default=str))
            for finished in ("summary.json", "summary.md"):  # the shorter run's; written again at the end
                (out / finished).unlink(missing_ok=True)
        return
    path.write_text(json.dumps(config, indent=2, default=str))


def edit_requests(data: Any, n: int | None = None, shuffle: bool = False,
                  seed: int = 0) -> tuple[Any, list[EditRequest]]:
    """The dataset (``None`` for plain requests) and the requests a run on ``data`` edits, in the order it
    edits them: the first ``n`` cases, in an order drawn from ``seed`` when ``shuffle``."""
    if isinstance(data, (str, Path)):
        from lmedit.data import load_dataset

        data = load_dataset(data, n=n)
    if hasattr(data, "requests"):
        dataset, requests = data, list(data.requests)
    else:
        from lmedit.requests import as_requests

        dataset, requests = None, as_requests(data)
    requests = requests[:n] if n else requests
    if shuffle:
        random.Random(seed).shuffle(requests)
    return dataset, requests


def run_requests(directory: str | Path) -> list[EditRequest]:
    """The requests the run in ``directory`` edits, in its order (from its ``run.json``: dataset, ``n``,
    ``order``, ``seed``). A run on plain requests, not a dataset, cannot be rebuilt and raises ``EvalError``."""
    path = Path(directory) / "run.json"
    if not path.is_file():
        raise EvalError(f"{directory} holds no run (no run.json)")
    config = json.loads(path.read_text())
    dataset = config["dataset"]
    source = dataset.get("path") or dataset.get("name")
    if not source or source == "requests":
        raise EvalError(f"the run in {directory} edited plain requests, not a dataset: its cases cannot be rebuilt")
    # a run from before ``order`` was recorded was run in file order
    return edit_requests(source, config["n"], config.get("order") == "shuffled", config.get("seed", 0))[1]


def read_cases(directory: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """The per-case records a run has written so far (``cases.jsonl``; none if there is no such file).

    Half a record at the end (the run was killed while writing it) is left out, and with ``repair`` cut
    from the file, so that appends start on a fresh line and that case is redone."""
    path = Path(directory) / "cases.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not text.endswith("\n"):
                if repair:
                    path.write_text("".join(json.dumps(r) + "\n" for r in records))
                break
            raise EvalError(f"{path}, line {i + 1}: not a JSON record ({e.msg})") from e
    return records
