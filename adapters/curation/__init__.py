"""Data curation: row formats, streaming NDJSON parsing, curation steps + pipeline, quality report."""

from .config import CurationConfig
from .feedback_rows import FeedbackItem, rows_from_feedback
from .ndjson import aiter_ndjson, iter_ndjson
from .pipeline import CurationResult, approx_token_count, run_pipeline
from .report import quality_report, quality_report_html
from .rows import Message, Row, RowError, parse_row
from .steps import StepReport

__all__ = [
    "CurationConfig",
    "CurationResult",
    "FeedbackItem",
    "Message",
    "Row",
    "RowError",
    "StepReport",
    "aiter_ndjson",
    "approx_token_count",
    "iter_ndjson",
    "parse_row",
    "quality_report",
    "quality_report_html",
    "rows_from_feedback",
    "run_pipeline",
]
