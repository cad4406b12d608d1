"""Benchmark datasets → ``EditRequest``s, from local files in their public formats.

    >>> from lmedit.data import load_dataset
    >>> data = load_dataset("counterfact", n=500)     # a short name, or any path to a JSON/JSONL file
    >>> data.requests[0].prompt
    'The mother tongue of Danielle Darrieux is'

Short names resolve against the data directory: ``$LMEDIT_DATA``, else the first ``shared/data``
found walking up from the working directory or from this package. Formats are detected from the
records' keys (see ``formats.FORMATS``); ``format=`` forces one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from lmedit.data.formats import FORMATS, MultiHopCase, Record, Unusable, detect_format
from lmedit.errors import DataError
from lmedit.requests import EditRequest

log = logging.getLogger(__name__)

NAMES = {
    "counterfact": "counterfact/counterfact-edit.json",
    "counterfact-train": "counterfact/counterfact-train.json",
    "counterfact-rome": "counterfact/counterfact_rome_500.json",
    "zsre": "zsre/zsre_mend_edit.json",
    "zsre-train": "zsre/zsre_mend_train-1k.json",
    "knowedit-zsre": "knowedit/benchmark_ZsRE_ZsRE-test-all.json",
    "knowedit-counterfact": "knowedit/benchmark_wiki_counterfact_train_cf.json",
    "wikibio": "knowedit/benchmark_WikiBio_wikibio-test-all.json",
    "mquake": "mquake/MQuAKE-hard.json",
    "hallucination": "lifelong/hallucination-edit.json",
    "hallucination-train": "lifelong/hallucination-train.json",
    "temporal": "lifelong/temporal-edit.json",
    "temporal-train": "lifelong/temporal-train.json",
}


@dataclass
class Dataset:
    """Edit cases loaded from one file.

    ``requests`` holds the edits; for multi-hop data (MQuAKE) ``cases`` holds the cases, each with its
    edits. ``skipped`` lists (record index, reason) of unusable records left out.
    """

    name: str
    path: Path
    format: str
    sha256: str
    requests: list[EditRequest]
    cases: list[MultiHopCase] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.cases) if self.cases else len(self.requests)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.cases if self.cases else self.requests)

    def describe(self) -> dict[str, Any]:
        """What reports record about the data."""
        return {"name": self.name, "path": str(self.path), "format": self.format, "sha256": self.sha256,
                "n": len(self), "skipped": len(self.skipped)}


def data_dir() -> Path | None:
    """The benchmark data directory, or ``None`` if there is none."""
    env = os.environ.get("LMEDIT_DATA")
    if env:
        return Path(env).expanduser()
    for start in (Path.cwd(), Path(__file__).resolve()):
        for parent in (start, *start.parents):
            candidate = parent / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return None


def resolve(source: str | Path) -> tuple[str, Path]:
    """(name, path) of a dataset given by short name or path."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.stem, path
    if str(source) in NAMES:
        root = data_dir()
        if root is None:
            raise DataError(f"no data directory for {source!r}: set LMEDIT_DATA to the folder holding the benchmark files")
        path = root / NAMES[str(source)]
        if not path.is_file():
            raise DataError(f"the dataset {source!r} is not in {root} (expected {NAMES[str(source)]})")
        return str(source), path
    raise DataError(f"unknown dataset {str(source)!r}: not a file, nor one of {', '.join(NAMES)}")


def load_dataset(source: str | Path, *, n: int | None = None, format: str | None = None,
                 strict: bool = False) -> Dataset:
    """Load a benchmark file (JSON list or JSONL) into ``EditRequest``s; ``n`` keeps the first usable ``n``.

    Records with missing or mistyped fields raise ``DataError`` (file, record index, field). Records that
    are well formed but unusable (subject not in the prompt, an empty target) are skipped and listed in
    ``Dataset.skipped``, or raise with ``strict=True``.
    """
    name, path = resolve(source)
    raw = path.read_bytes()
    records = _parse(raw, path)
    if not records:
        raise DataError(f"{path.name} holds no records")
    fmt = format or detect_format(records[0])
    if fmt not in FORMATS:
        raise DataError(f"{path.name}: cannot tell its format from record 0's fields; pass format= one of "
                        f"{', '.join(FORMATS)}" if format is None else f"unknown format {format!r}; accepted: {', '.join(FORMATS)}")
    convert = FORMATS[fmt]
    items: list[Any] = []
    skipped: list[tuple[int, str]] = []
    for index, data in enumerate(records):
        if n is not None and len(items) >= n:
            break
        try:
            items.append(convert(Record(data, path, index)))
        except Unusable as e:
            if strict:
                raise DataError(str(e)) from None
            skipped.append((index, str(e)))
    if skipped:
        log.warning("%s: skipped %d unusable record(s), e.g. %s", path.name, len(skipped), skipped[0][1])
    digest = hashlib.sha256(raw).hexdigest()
    if fmt == "mquake":
        return Dataset(name, path, fmt, digest, [r for c in items for r in c.requests], items, skipped)
    return Dataset(name, path, fmt, digest, items, [], skipped)


def _parse(raw: bytes, path: Path) -> list[Any]:
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path.name} is neither JSON nor JSON lines (line {number}: {e.msg})") from None
    if isinstance(data, dict):
        data = data.get("data", data.get("records", [data]))
    if not isinstance(data, list):
        raise DataError(f"{path.name} should hold a list of records")
    return data


__all__ = ["Dataset", "MultiHopCase", "NAMES", "data_dir", "load_dataset", "resolve"]
