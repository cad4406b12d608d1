"""Reports: the literature's table (method rows, metric columns) and lifelong curves."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

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
    """A ``Report`` (configuration and summary, no per-case records) from a run directory."""
    from lmedit.evaluate.runner import EvalError, Report

    path = Path(directory) / "summary.json"
    if not path.is_file():
        raise EvalError(f"{directory} is not an evaluation run (no summary.json)")
    data = json.loads(path.read_text())
    return Report(data["config"], [], data["summary"], Path(directory))


def _placement(config: dict[str, Any]) -> str:
    """`` [cuda:0, bfloat16]`` for runs off the CPU or in another dtype than float32 (their s/edit and
    scores are not the CPU float32 ones); empty otherwise."""
    model = config.get("model", {})
    device, dtype = str(model.get("device", "cpu")), str(model.get("dtype", "torch.float32")).replace("torch.", "")
    parts = [p for p, default in ((device, "cpu"), (dtype, "float32")) if p != default]
    return f" [{', '.join(parts)}]" if parts else ""


def _rows(report: Any) -> list[tuple[str, dict[str, Any]]]:
    c = report.config
    label = f"{c['method']} ({c['protocol']}" + (f", {c['scoring']}" if c.get("scoring") else "") + ")" + _placement(c)
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


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


def plot_curves(report: Any, path: str | Path) -> Path:
    """PNG of each metric against the number of edits T (log scale), from a lifelong run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_t = report.summary["by_T"]
    ts = sorted(int(t) for t in by_t)
    metrics = [(k, h) for k, h in COLUMNS[:9] if any(k in by_t[t] for t in by_t)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, header in metrics:
        ax.plot(ts, [by_t[t].get(key, float("nan")) for t in by_t], marker="o", label=header)
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
