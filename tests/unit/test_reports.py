"""REPORT_GENERATION writes real CSV, HTML and PDF files that read back to the submitted table."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pypdf import PdfReader

import common.builtin  # noqa: F401 - registers the built-in job types
from common.builtin.reports import ReportPayload
from common.errors import RetryableError
from common.handlers import JobContext, registered

COLUMNS = ["region", "orders", "revenue", "active", "note"]
ROWS: list[list[Any]] = [
    ["North", 120, 10450.5, True, "steady"],
    ["South", 98, 8120.0, False, None],
    ["Ωμέγα Привет", 7, -3.25, True, 'naïve café, "quoted", comma'],
]


@pytest.fixture
def ctx(tmp_path: Path) -> JobContext:
    return JobContext(
        job_id=uuid.uuid4(),
        job_type="REPORT_GENERATION",
        attempt=1,
        retries=0,
        artifact_dir=tmp_path,
    )


def run_report(ctx: JobContext, **payload: Any) -> dict[str, Any]:
    job_type = registered()["REPORT_GENERATION"]
    return job_type.run(job_type.parse_payload(payload), ctx)


def stored(ctx: JobContext, result: dict[str, Any]) -> Path:
    return ctx.artifact_dir / str(ctx.job_id) / result["artifact"]


def test_a_csv_report_parses_back_to_the_submitted_rows(ctx: JobContext) -> None:
    result = run_report(ctx, title="Sales", columns=COLUMNS, rows=ROWS, format="csv")

    with stored(ctx, result).open(newline="", encoding="utf-8") as f:
        parsed = list(csv.reader(f))
    assert parsed[0] == COLUMNS
    assert parsed[1:] == [
        ["North", "120", "10450.5", "true", "steady"],
        ["South", "98", "8120.0", "false", ""],
        ["Ωμέγα Привет", "7", "-3.25", "true", 'naïve café, "quoted", comma'],
    ]
    assert result["rows"] == 3
    assert result["content_type"] == "text/csv"


def test_an_html_report_is_a_standalone_page_with_every_value_escaped(ctx: JobContext) -> None:
    rows = [["<script>alert(1)</script>", 1, 2.0, False, "a & b"]]
    result = run_report(ctx, title="<b>Sales</b>", columns=COLUMNS, rows=rows, format="html")

    page = stored(ctx, result).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in page
    assert "<script>" not in page and "<b>Sales</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<title>&lt;b&gt;Sales&lt;/b&gt;</title>" in page
    assert "a &amp; b" in page
    assert '<th scope="col">revenue</th>' in page
    assert "http" not in page  # no external assets
    assert result["content_type"] == "text/html"


def test_a_pdf_report_opens_and_shows_the_title_and_every_cell(ctx: JobContext) -> None:
    result = run_report(ctx, title="Quarterly sales Ωμέγα", columns=COLUMNS, rows=ROWS)

    assert result["format"] == "pdf" and result["content_type"] == "application/pdf"
    reader = PdfReader(stored(ctx, result))
    text = "\n".join(page.extract_text() for page in reader.pages)
    assert "Quarterly sales Ωμέγα" in text
    assert "Generated " in text and "UTC" in text
    for cell in ["region", "North", "10450.5", "8120.0", "false", "Ωμέγα Привет", "naïve café"]:
        assert cell in text
    assert "page 1 of 1" in text
    assert reader.metadata is not None and reader.metadata.title == "Quarterly sales Ωμέγα"


def test_a_long_pdf_report_repeats_its_headings_and_numbers_every_page(ctx: JobContext) -> None:
    rows = [[f"region {i}", i, i * 1.5, i % 2 == 0, "x" * (i % 300)] for i in range(400)]
    result = run_report(ctx, title="Long", columns=COLUMNS, rows=rows)

    reader = PdfReader(stored(ctx, result))
    pages = len(reader.pages)
    assert pages > 2
    last = reader.pages[-1].extract_text()
    assert "region" in last and "revenue" in last
    assert f"page {pages} of {pages}" in last
    text = "\n".join(page.extract_text() for page in reader.pages)
    assert "region 0" in text and "region 399" in text


def test_characters_the_pdf_font_cannot_draw_become_question_marks(ctx: JobContext) -> None:
    result = run_report(ctx, title="CJK 漢字", columns=["word"], rows=[["漢字 ok"]])

    text = PdfReader(stored(ctx, result)).pages[0].extract_text()
    assert "CJK ??" in text and "?? ok" in text


@pytest.mark.parametrize("fmt", ["csv", "html", "pdf"])
def test_the_result_size_and_checksum_match_the_stored_file(ctx: JobContext, fmt: str) -> None:
    result = run_report(ctx, title="Sales", columns=COLUMNS, rows=ROWS, format=fmt)

    data = stored(ctx, result).read_bytes()
    assert result["artifact"] == f"report-{str(ctx.job_id)[:8]}.{fmt}"
    assert result["bytes"] == len(data)
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert result["location"] == f"/jobs/{ctx.job_id}/artifact"


def test_an_empty_report_still_renders_in_every_format(ctx: JobContext) -> None:
    for fmt in ["csv", "html", "pdf"]:
        result = run_report(ctx, title="Nothing", columns=["a", "b"], rows=[], format=fmt)
        assert result["rows"] == 0 and result["bytes"] > 0
    text = PdfReader(stored(ctx, result)).pages[0].extract_text()
    assert "No rows." in text


def test_a_row_with_the_wrong_number_of_cells_fails_validation() -> None:
    with pytest.raises(ValidationError, match="row 1 has 1 cells but there are 2 columns"):
        ReportPayload.model_validate({"title": "t", "columns": ["a", "b"], "rows": [[1, 2], [3]]})


@pytest.mark.parametrize(
    "payload",
    [
        {"title": "", "columns": ["a"]},
        {"title": "t", "columns": []},
        {"title": "t", "columns": ["a"], "format": "docx"},
        {"title": "t", "columns": ["a"], "rows": [[{"nested": 1}]]},
        {"title": "t", "columns": ["a"], "colour": "red"},
        {"title": "t", "columns": [f"c{i}" for i in range(51)]},
    ],
)
def test_a_malformed_payload_is_rejected(payload: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ReportPayload.model_validate(payload)


def test_a_payload_over_the_row_limit_is_rejected() -> None:
    with pytest.raises(ValidationError):
        ReportPayload.model_validate(
            {"title": "t", "columns": ["a"], "rows": [[i] for i in range(100_001)], "format": "csv"}
        )


@pytest.mark.parametrize("fmt", ["csv", "html", "pdf"])
def test_a_cancelled_attempt_stops_and_leaves_no_artifact(ctx: JobContext, fmt: str) -> None:
    ctx.cancelled.set()
    with pytest.raises(RetryableError, match="stopped"):
        run_report(ctx, title="Big", columns=["n"], rows=[[i] for i in range(2000)], format=fmt)

    assert list((ctx.artifact_dir / str(ctx.job_id)).iterdir()) == []


def test_the_csv_report_is_utf8_without_a_byte_order_mark(ctx: JobContext) -> None:
    result = run_report(ctx, title="t", columns=["w"], rows=[["Ωμέγα"]], format="csv")

    data = stored(ctx, result).read_bytes()
    assert data == "w\r\nΩμέγα\r\n".encode()
    assert list(csv.reader(io.StringIO(data.decode()))) == [["w"], ["Ωμέγα"]]


def test_each_job_stores_its_report_under_a_name_of_its_own(tmp_path: Path) -> None:
    names = set()
    for _ in range(2):
        ctx = JobContext(uuid.uuid4(), "REPORT_GENERATION", 1, 0, tmp_path)
        result = run_report(ctx, title="Sales", columns=["a"], rows=[[1]])
        assert result["artifact"] == f"report-{str(ctx.job_id)[:8]}.pdf"
        assert stored(ctx, result).is_file()
        names.add(result["artifact"])

    assert len(names) == 2  # two downloads into one folder do not collide


def test_csv_cells_a_spreadsheet_would_run_as_formulas_start_with_a_quote(
    ctx: JobContext,
) -> None:
    columns = ["=cmd", "name", "n", "x"]
    rows: list[list[Any]] = [
        ['=HYPERLINK("http://evil")', "+1+2", -5, -3.2],
        ["-2+3", "@SUM(A1:A9)", "-5", "\tlead"],
        ["\rcr", "safe = text", "+3", "-"],
        ["plain", "a-b", 0, True],
    ]

    result = run_report(ctx, title="t", columns=columns, rows=rows, format="csv")

    with stored(ctx, result).open(newline="", encoding="utf-8") as f:
        parsed = list(csv.reader(f))
    assert parsed == [
        ["'=cmd", "name", "n", "x"],
        ['\'=HYPERLINK("http://evil")', "'+1+2", "-5", "-3.2"],
        ["'-2+3", "'@SUM(A1:A9)", "-5", "'\tlead"],
        ["'\rcr", "safe = text", "+3", "'-"],
        ["plain", "a-b", "0", "true"],
    ]


def test_html_and_pdf_reports_show_formula_like_cells_unchanged(ctx: JobContext) -> None:
    result = run_report(ctx, title="t", columns=["f"], rows=[["=1+1"]], format="html")

    assert "<td>=1+1</td>" in stored(ctx, result).read_text(encoding="utf-8")


def test_building_a_pdf_logs_nothing_below_warning_from_font_subsetting(
    ctx: JobContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    run_report(ctx, title="Quiet", columns=COLUMNS, rows=ROWS, format="pdf")

    chatter = [r for r in caplog.records if r.name.startswith("fontTools")]
    assert chatter == []


@dataclass
class RecordingContext(JobContext):
    """A JobContext that keeps every progress report, unthrottled."""

    reports: list[tuple[float, str | None]] = field(default_factory=list)

    def progress(self, fraction: float, message: str | None = None) -> None:
        assert 0.0 <= fraction <= 1.0
        self.reports.append((fraction, message))


@pytest.mark.parametrize("fmt", ["csv", "html", "pdf"])
def test_a_report_reports_progress_rising_to_one_as_its_rows_render(
    tmp_path: Path, fmt: str
) -> None:
    ctx = RecordingContext(uuid.uuid4(), "REPORT_GENERATION", 1, 0, tmp_path)
    rows = [[f"r{i}", i] for i in range(12_000)]

    run_report(ctx, title="Big", columns=["name", "n"], rows=rows, format=fmt)

    fractions = [fraction for fraction, _ in ctx.reports]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0 and fractions.count(1.0) == 1
    assert len([f for f in fractions if 0.0 < f < 1.0]) >= 20  # 12,000 rows, 500 a chunk
    assert ctx.reports[-1][1] == "report ready: 12,000 rows"
    assert any(message and "6,000 of 12,000 rows" in message for _, message in ctx.reports)


def test_an_empty_report_still_ends_its_progress_at_one(tmp_path: Path) -> None:
    ctx = RecordingContext(uuid.uuid4(), "REPORT_GENERATION", 1, 0, tmp_path)

    run_report(ctx, title="Nothing", columns=["a"], rows=[], format="csv")

    assert ctx.reports[-1][0] == 1.0
