"""``freezelab report``: what a sweep's freeze policies bought, as an HTML page.

>>> from freezelab.report import build_report, linear_cka
>>> report = build_report("policy-sweep", out_dir="report/")  # doctest: +SKIP
"""

from freezelab.report.build import Report, build_report
from freezelab.report.cka import backbone_cka, linear_cka
from freezelab.report.rows import pareto_front
from freezelab.report.runs import ReportError
from freezelab.report.summary import format_settings, summarize

__all__ = [
    "Report",
    "ReportError",
    "backbone_cka",
    "build_report",
    "format_settings",
    "linear_cka",
    "pareto_front",
    "summarize",
]
