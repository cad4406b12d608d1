"""Reports: the literature's table (method rows, metric columns) and lifelong curves."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from lmedit.errors import EvalError

# Column order of tables: reliability, generalisation, locality, portability, CounterFact scores, cost.
COLUMNS = [
    ("rewrite_tf", "Rel.(tf)"), ("rewrite_em", "Rel.(gen)"), ("rephrase_tf", "Gen.(tf)"), ("rephrase_em", "Gen.(gen)"),
    ("locality_tf", "Loc.(tf)"), ("locality_em", "Loc.(gen)"), ("locality_acc", "Loc.acc"),
    ("portability_tf", "Port.(tf)"), ("portability_em", "Port.(gen)"), ("efficacy", "Eff."), ("paraphrase", "Para."),
    ("neighborhood", "Neigh."), ("efficacy_mag", "Eff.mag"), ("fluency", "Fluency"), ("consistency", "Consist."),
    ("multihop_acc", "Multi-hop"), ("multihop_q_acc", "MH q-acc"), ("multihop_old", "MH old"), ("edit_acc", "Edit acc"),
    ("rewrite_ppl", "PPL"), ("edit_failed", "Failed"), ("edit_seconds", "s/edit"),
]


def load_report(directory: str | Path) -> Any:
    """A ``Report`` (configuration and summary, no per-case records) from a run directory.

    A run still under way (or stopped, to be resumed) has no ``summary.json`` yet: its settings
    (``run.json``) and the cases scored so far (``cases.jsonl``) are summarised instead, and its
    configuration says ``"in_progress": true`` and ``"cases_done"``, how many of its ``n`` cases are done.
    """
    from lmedit.evaluate.run_files import read_cases
    from lmedit.evaluate.runner import Report, summarize

    directory = Path(directory)
    path = directory / "summary.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return Report(data["config"], [], data["summary"], directory)
    settings, cases = directory / "run.json", directory / "cases.jsonl"
    if not (settings.is_file() and cases.is_file()):
        raise EvalError(f"{directory} is not an evaluation run (no summary.json, nor run.json and cases.jsonl)")
    config = {**json.loads(settings.read_text()), "in_progress": True}
    records = read_cases(directory)
    config["cases_done"] = _cases_done(directory, config, records)
    lifelong = config.get("protocol") == "sequential" and config.get("scoring") == "after_all"
    return Report(config, [], summarize(records, by_t=lifelong), directory)


def _cases_done(directory: Path, config: dict[str, Any], records: Sequence[dict[str, Any]]) -> int:
    """How many of a run's cases are done: for a sequential run, the cases its checkpointed edit state holds
    (edit calls × batch size; scoring only reaches them at the marks), else the distinct cases scored."""
    from lmedit.evaluate.sequential import read_progress

    progress = read_progress(directory / "state") if config.get("protocol") == "sequential" else None
    if progress is not None:
        calls = int(progress.get("chunks_done", 0))
        return min(int(config.get("n") or 0), calls * int(config.get("batch_size") or 1))
    return len({str(r.get("case_id")) for r in records})


def _in_progress(config: dict[str, Any]) -> str:
    """`` [in progress: 510/1000]`` for a run under way or stopped, empty for a finished one."""
    if not config.get("in_progress"):
        return ""
    done = config.get("cases_done")
    return f" [in progress: {done}/{config.get('n')}]" if done is not None else " [in progress]"


def _placement(config: dict[str, Any]) -> str:
    """`` [cuda:0, bfloat16]`` for runs off the CPU or in another dtype than float32 (their s/edit and
    scores are not the CPU float32 ones); empty otherwise."""
    model = config.get("model", {})
    device, dtype = str(model.get("device", "cpu")), str(model.get("dtype", "torch.float32")).replace("torch.", "")
    parts = [p for p, default in ((device, "cpu"), (dtype, "float32")) if p != default]
    return f" [{', '.join(parts)}]" if parts else ""


def _rows(report: Any) -> list[tuple[str, dict[str, Any]]]:
    c = report.config
    label = (f"{c['method']} ({c['protocol']}" + (f", {c['scoring']}" if c.get("scoring") else "") + ")"
             + _placement(c) + _in_progress(c))
    if "by_T" in report.summary:  # lifelong rows; the mean edit time (over all T edits) on the last one
        rows = [(f"{label} T={t}", dict(m)) for t, m in report.summary["by_T"].items()]
        if rows and c.get("edit_seconds_mean") is not None and "edit_seconds" not in rows[-1][1]:
            rows[-1][1]["edit_seconds"] = c["edit_seconds_mean"]
        return rows
    return [(label, report.summary["overall"])]


def markdown_table(reports: Sequence[Any]) -> str:
    """One Markdown table: a row per run (per T for lifelong runs), a column per metric present."""
    rows = [(f"{r.config['model']['name']} / {r.config['dataset'].get('name', '?')}", label, m)
            for r in reports for label, m in _rows(r)]
    cols = [(k, h) for k, h in COLUMNS if any(k in m for _, _, m in rows)]
    lines = ["| model / data | method | n | " + " | ".join(h for _, h in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for source, label, m in rows:
        cells = [_fmt(m.get(k)) for k, _ in cols]
        lines.append(f"| {source} | {label} | {m.get('cases', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def edit_log_table(directory: str | Path, block: int = 100, max_columns: int = 8) -> str:
    """A sequential run's ``edits.jsonl`` (see ``lmedit.evaluate.sequential``) as a Markdown table by blocks of
    ``block`` edit calls: cases, seconds per case, declined calls, and the block's mean of each number the method
    reports of its training (``steps``, ``loss``, ``nll``, …; a per-case list, such as v*'s ``v_prob``, by its mean;
the first ``max_columns`` met). Empty when the run
    has no edit log (runs begun before session 41, and the single and batch protocols)."""
    from lmedit.evaluate.sequential import read_edit_log

    if block < 1:
        raise EvalError(f"the edit log's block must be at least 1 call, not {block}")
    entries = read_edit_log(directory)
    if not entries:
        return ""
    numbers: list[str] = []
    for e in entries:
        for key, value in e.get("info", {}).items():
            if _number(value) is not None and key not in numbers and key != "seconds":
                numbers.append(key)
    numbers = numbers[:max_columns]
    lines = ["| calls | cases | s/case | declined | " + " | ".join(numbers) + " |", "|---|---|---|---|" + "---|" * len(numbers)]
    for start in range(0, len(entries), block):
        part = entries[start:start + block]
        cases = sum(len(e.get("cases", [])) for e in part)
        cells = [_fmt(_mean([x for e in part if (x := _number(e.get("info", {}).get(k))) is not None])) for k in numbers]
        lines.append(f"| {part[0]['call'] + 1}–{part[-1]['call'] + 1} | {cases} | "
                     f"{_fmt(sum(e.get('seconds', 0.0) for e in part) / max(1, cases))} | "
                     f"{sum(bool(e.get('declined')) for e in part)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def retention_table(directory: str | Path, block: int = 100, metric: str = "rewrite_tf") -> str:
    """A lifelong run's forgetting: ``metric`` of each block of ``block`` edits (in the order they were made)
    at each scoring mark T, as a Markdown table (rows: edit blocks; columns: marks). Row i, column T is the mean
    over the i-th block's cases scored after all T edits — down a column, old against new edits; along a row,
    how a block fares as later edits arrive. The edit order is read from ``cases.jsonl`` (each mark scores its
    cases in edit order). Empty for a run without marks (single, batch, ``after_each``)."""
    from lmedit.evaluate.run_files import read_cases

    if block < 1:
        raise EvalError(f"the retention table's block must be at least 1 edit, not {block}")
    settings = Path(directory) / "run.json"
    config = json.loads(settings.read_text()) if settings.is_file() else {}
    if config.get("scoring") != "after_all":  # after_each scores each case once, at its own T
        return ""
    cases = [c for c in read_cases(directory) if "T" in c]
    if not cases:
        return ""
    names = {k for c in cases for k, v in c.items() if _number(v) is not None} - {"T", "edit_failed", "edit_seconds"}
    if metric not in names:
        raise EvalError(f"{directory} has no per-case '{metric}'; it has: {', '.join(sorted(names))}")
    marks = sorted({int(c["T"]) for c in cases})
    order: dict[str, int] = {}
    for t in marks:
        for c in cases:
            if int(c["T"]) == t:
                order.setdefault(str(c["case_id"]), len(order))
    scores: dict[tuple[int, int], list[float]] = {}
    for c in cases:
        if (value := _number(c.get(metric))) is not None:
            scores.setdefault((order[str(c["case_id"])] // block, int(c["T"])), []).append(value)
    lines = ["| edits | " + " | ".join(f"T={t}" for t in marks) + " |", "|---|" + "---|" * len(marks)]
    for b in range(max(order.values()) // block + 1):
        cells = [_fmt(_mean(scores.get((b, t), []))) for t in marks]
        lines.append(f"| {b * block + 1}–{min(len(order), (b + 1) * block)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: Any) -> float | None:
    """A number as itself, a non-empty list of numbers as its mean; ``None`` for anything else."""
    def plain(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if plain(value):
        return float(value)
    if isinstance(value, list) and value and all(plain(x) for x in value):
        return sum(value) / len(value)
    return None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_t(report: Any) -> list[tuple[int, dict[str, Any]]]:
    """A lifelong run's marks ``(T, metrics)`` in increasing T."""
    return sorted(((int(t), m) for t, m in report.summary["by_T"].items()), key=lambda tm: tm[0])


def plot_curves(report: Any, path: str | Path) -> Path:
    """PNG of each metric against the number of edits T (log scale), from a lifelong run."""
    plt = _figure()
    marks = _by_t(report)
    metrics = [(k, h) for k, h in COLUMNS[:9] if any(k in m for _, m in marks)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, header in metrics:
        ax.plot([t for t, _ in marks], [m.get(key, float("nan")) for _, m in marks], marker="o", label=header)
    ax.set_xscale("log")
    ax.set_xlabel("number of sequential edits T")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    c = report.config
    ax.set_title(f"{c['method']} on {c['model']['name']} / {c['dataset'].get('name', '?')} ({c.get('scoring')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def curve_label(config: dict[str, Any]) -> str:
    """A lifelong run's name in a comparison: the method, WISE's mode, the batch size when > 1."""
    label = config["method"]
    mode = config.get("hparams", {}).get("mode")
    if mode:
        label += f"-{mode}"
    if (config.get("batch_size") or 1) > 1:
        label += f" (batches of {config['batch_size']})"
    return label + _placement(config) + _in_progress(config)


_MARKERS = ("o", "s", "^", "D", "v")
_LINESTYLES = ("-", "--", ":", "-.")


def curve_styles(n: int) -> list[dict[str, str]]:
    """``n`` distinct line styles: the ten ``tab10`` colours, then the same colours with another marker and
    dash pattern, so that no two runs of a comparison share a look (the default colour cycle repeats after ten)."""
    colours = [f"C{i}" for i in range(10)]
    return [{"color": colours[i % 10], "marker": _MARKERS[(i // 10) % len(_MARKERS)],
             "linestyle": _LINESTYLES[(i // 10) % len(_LINESTYLES)]} for i in range(n)]


def plot_comparison(reports: Sequence[Any], path: str | Path,
                    metrics: Sequence[str] = ("rewrite_tf", "rephrase_tf", "locality_tf")) -> Path:
    """PNG comparing lifelong runs: a panel per metric (reliability, generalisation, locality by default)
    against the number of sequential edits T (log scale), a line per run; an unedited run (method
    ``none``) among ``reports`` is drawn as a dashed reference line. Other runs that are not lifelong (no
    scores by T) are left out; an error if no run is lifelong."""
    runs = [r for r in reports if "by_T" in r.summary]
    unedited = [r for r in reports if r.config.get("method") in ("none", "unedited") and "by_T" not in r.summary]
    if not runs:
        raise EvalError("none of these runs is a sequential (lifelong) run scored at several T: nothing to plot")
    plt = _figure()
    headers = dict(COLUMNS)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.0), sharey=True, squeeze=False)
    styles = curve_styles(len(runs))
    for ax, key in zip(axes[0], metrics):
        for r, style in zip(runs, styles):
            marks = [(t, m[key]) for t, m in _by_t(r) if m.get(key) is not None]
            if marks:
                ax.plot([t for t, _ in marks], [v for _, v in marks], label=curve_label(r.config), **style)
        for r in unedited[:1]:  # the unedited model's score, for reference
            if r.summary["overall"].get(key) is not None:
                ax.axhline(r.summary["overall"][key], color="gray", linestyle="--", linewidth=1, label="unedited")
        ax.set_xscale("log")
        ax.set_xlabel("number of sequential edits T")
        ax.set_title(headers.get(key, key))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score (after all T edits)" if runs[0].config.get("scoring") == "after_all" else "score")
    sources = sorted({f"{r.config['model']['name']} / {r.config['dataset'].get('name', '?')}" for r in runs})
    fig.suptitle(", ".join(sources))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 5), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
