"""The report of a sweep store: HTML (plotly, self-contained) and CSV / Parquet / JSON exports.

>>> from joules.report import render_report, export   # doctest: +SKIP
>>> render_report("joules.db", "report.html")         # doctest: +SKIP
>>> from joules.sweep.analyze import Constraints
>>> render_report("joules.db", "report.html", Constraints(max_kld=0.05), "energy")  # doctest: +SKIP
>>> export("joules.db", "csv", "joules.csv")          # doctest: +SKIP
"""

from joules.report.answer import Answer, answers
from joules.report.data import EXPORTS, ReportData, export, load_report_data
from joules.report.html import render_html, render_report

__all__ = [
    "EXPORTS",
    "Answer",
    "ReportData",
    "answers",
    "export",
    "load_report_data",
    "render_html",
    "render_report",
]
