"""Evaluation: metrics, protocols (single / batch / sequential), runs and reports."""
from lmedit.evaluate.report import load_report, markdown_table, plot_comparison, plot_curves
from lmedit.evaluate.run_files import edit_requests, run_requests
from lmedit.evaluate.runner import PROTOCOLS, EvalError, Report, evaluate, resummarize, summarize

__all__ = ["PROTOCOLS", "EvalError", "Report", "edit_requests", "evaluate", "load_report", "markdown_table", "plot_comparison", "plot_curves", "resummarize", "run_requests", "summarize"]
