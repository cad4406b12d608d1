"""Evaluation: metrics, protocols (single / batch / sequential), runs and reports."""
from lmedit.evaluate.report import load_report, markdown_table, plot_comparison, plot_curves
from lmedit.evaluate.runner import PROTOCOLS, EvalError, Report, evaluate, resummarize, summarize

__all__ = ["PROTOCOLS", "EvalError", "Report", "evaluate", "load_report", "markdown_table", "plot_comparison", "plot_curves", "resummarize", "summarize"]
