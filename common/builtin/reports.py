"""REPORT_GENERATION: a table from the payload as a CSV, HTML or PDF artifact."""

from __future__ import annotations

import csv
import html
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import IO, Annotated, Any, Literal

from fpdf import FPDF
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.artifacts import artifact_name, csv_safe, text_writer, write_artifact
from common.errors import RetryableError
from common.handlers import JobContext, job_handler

log = logging.getLogger(__name__)
# fpdf2 subsets the embedded font with fontTools, which logs some 40 INFO lines per PDF.
logging.getLogger("fontTools").setLevel(logging.WARNING)

MAX_ROWS = 100_000
MAX_COLUMNS = 50
#: About 35 µs per PDF cell measured: this keeps the largest PDF under a minute of work.
MAX_PDF_CELLS = 1_000_000
#: Rows rendered between two looks at `ctx.should_stop()` and two progress reports.
CHUNK_ROWS = 500
#: The share of a PDF's progress spent on laying out rows; the rest is writing the file.
PDF_ROWS_SHARE = 0.9

Cell = Annotated[str, Field(max_length=10_000)] | int | float | bool | None
ReportFormat = Literal["csv", "html", "pdf"]


class ReportPayload(BaseModel):
    """Payload of REPORT_GENERATION: a titled table and the format to render it in."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "title": "Sales by region",
                    "columns": ["region", "orders", "revenue"],
                    "rows": [["North", 120, 10450.5], ["South", 98, 8120.0]],
                    "format": "pdf",
                }
            ]
        },
    )

    title: str = Field(
        min_length=1,
        max_length=200,
        description="Shown at the top of the report (and as the PDF/HTML document title)",
        examples=["Sales by region"],
    )
    columns: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1,
        max_length=MAX_COLUMNS,
        description=f"Column headings, in order (1 to {MAX_COLUMNS})",
        examples=[["region", "orders", "revenue"]],
    )
    rows: list[list[Cell]] = Field(
        default_factory=list,
        max_length=MAX_ROWS,
        description=(
            f"The table body, at most {MAX_ROWS:,} rows; each row has one scalar cell "
            "(string, number, boolean or null) per column"
        ),
        examples=[[["North", 120, 10450.5], ["South", 98, 8120.0]]],
    )
    format: ReportFormat = Field(
        default="pdf",
        description="Artifact format: csv, html or pdf",
        examples=["pdf", "csv", "html"],
    )

    @model_validator(mode="after")
    def _rows_fit_columns(self) -> ReportPayload:
        width = len(self.columns)
        for index, row in enumerate(self.rows):
            if len(row) != width:
                raise ValueError(f"row {index} has {len(row)} cells but there are {width} columns")
        if self.format == "pdf" and width * len(self.rows) > MAX_PDF_CELLS:
            raise ValueError(
                f"a PDF report holds at most {MAX_PDF_CELLS:,} cells; use csv or html for more"
            )
        return self


@job_handler("REPORT_GENERATION", payload_model=ReportPayload)
def generate_report(payload: ReportPayload, ctx: JobContext) -> dict[str, Any]:
    """Render a table as CSV, HTML or PDF and store it as the job's artifact.

    Reports progress as rows are rendered. Returns the artifact's name (its own per
    job: `report-<short job id>.<format>`), size, SHA-256, content type and download
    location.
    """
    render = _RENDERERS[payload.format]
    generated_at = datetime.now(UTC)
    info = write_artifact(
        ctx.artifact_dir,
        ctx.job_id,
        artifact_name("report", ctx.job_id, payload.format),
        lambda out: render(payload, out, ctx, generated_at),
    )
    ctx.progress(1.0, f"report ready: {len(payload.rows):,} rows")
    return {**info.as_result(ctx.job_id), "format": payload.format, "rows": len(payload.rows)}


def format_cell(value: Any) -> str:
    """A cell as text: null is empty, booleans are lower-case like JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _checkpoint(ctx: JobContext, done: int, total: int, share: float = 1.0) -> None:
    """Between two chunks: stop if asked, else report `done` rows as `share` of the work."""
    if ctx.should_stop():
        # The temp file is dropped by write_artifact; a later attempt starts over.
        raise RetryableError(
            f"report stopped after {done} of {total} rows (time limit or shutdown)"
        )
    # Short of 1.0: the job is done only once the artifact is stored.
    fraction = min(share * done / total, 0.99) if total else 0.0
    ctx.progress(fraction, f"{done:,} of {total:,} rows rendered")


def _generated_line(generated_at: datetime, rows: int) -> str:
    return f"Generated {generated_at:%Y-%m-%d %H:%M:%S} UTC · {rows:,} rows"


def render_csv(payload: ReportPayload, out: IO[bytes], ctx: JobContext, _at: datetime) -> None:
    """RFC 4180 CSV with a heading row; the title lives in the job, not in the data.

    Text that a spreadsheet would run as a formula is prefixed with `'` (`csv_safe`);
    numbers are written as they are.
    """
    with text_writer(out) as text:
        writer = csv.writer(text)
        writer.writerow([csv_safe(c) for c in payload.columns])
        for start in range(0, len(payload.rows), CHUNK_ROWS):
            _checkpoint(ctx, start, len(payload.rows))
            chunk = payload.rows[start : start + CHUNK_ROWS]
            writer.writerows(
                [csv_safe(v) if isinstance(v, str) else format_cell(v) for v in row]
                for row in chunk
            )


_HTML_HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #bbb; padding: .3rem .6rem; vertical-align: top; }}
th {{ background: #eee; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tbody tr:nth-child(even) {{ background: #fafafa; }}
.meta {{ color: #666; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p class="meta">{generated}</p>
<table>
<thead><tr>{headings}</tr></thead>
<tbody>
"""
_HTML_TAIL = "</tbody>\n</table>\n</body>\n</html>\n"


def render_html(
    payload: ReportPayload, out: IO[bytes], ctx: JobContext, generated_at: datetime
) -> None:
    """A standalone page (no external assets) with every value escaped."""
    esc = html.escape
    with text_writer(out, newline="\n") as text:
        text.write(
            _HTML_HEAD.format(
                title=esc(payload.title),
                generated=esc(_generated_line(generated_at, len(payload.rows))),
                headings="".join(f'<th scope="col">{esc(c)}</th>' for c in payload.columns),
            )
        )
        for start in range(0, len(payload.rows), CHUNK_ROWS):
            _checkpoint(ctx, start, len(payload.rows))
            lines = []
            for row in payload.rows[start : start + CHUNK_ROWS]:
                cells = "".join(
                    f'<td class="num">{esc(format_cell(v))}</td>'
                    if _is_number(v)
                    else f"<td>{esc(format_cell(v))}</td>"
                    for v in row
                )
                lines.append(f"<tr>{cells}</tr>\n")
            text.write("".join(lines))
        text.write(_HTML_TAIL)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


FONT_FAMILY = "ReportSans"
LINE_HEIGHT = 4.5  # mm, for a 8 pt body
MAX_CELL_LINES = 8  # a long cell is cut here so one row cannot outgrow a page
_DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


@lru_cache(maxsize=1)
def unicode_font() -> Path | None:
    """A TTF covering Latin, Greek and Cyrillic: Noto Sans from the `fontpkg-noto-sans`
    dependency, else the system's DejaVu Sans; None leaves PDFs to a Latin-1 core font."""
    try:
        noto = resources.files("fontpkg_noto_sans") / "files" / "NotoSans[wdth,wght].ttf"
        if noto.is_file():
            # A variable font: fpdf2 embeds its default instance (Regular), which is
            # instant, where instancing a Bold costs seconds, so headings use shading.
            return Path(str(noto))
    except ModuleNotFoundError:
        pass
    return _DEJAVU if _DEJAVU.is_file() else None


class _Glyphs(dict[int, int]):
    """A str.translate table sending characters the font cannot draw to '?' (cached)."""

    def __init__(self, has_glyph: Callable[[int], bool]) -> None:
        super().__init__()
        self._has_glyph = has_glyph

    def __missing__(self, codepoint: int) -> int:
        mapped = codepoint if self._has_glyph(codepoint) else ord("?")
        if codepoint < 32:
            mapped = 32  # tabs and newlines in a cell become spaces
        self[codepoint] = mapped
        return mapped


class _ReportPDF(FPDF):
    """A4 pages with a title, a shaded heading row repeated per page, and page numbers."""

    def __init__(self, title: str, landscape: bool) -> None:
        super().__init__(orientation="L" if landscape else "P", unit="mm", format="A4")
        font = unicode_font()
        if font is not None:
            self.add_font(FONT_FAMILY, "", font)
            cmap: dict[int, Any] = getattr(self.fonts[FONT_FAMILY.lower()], "cmap", {})
            self.body_font = FONT_FAMILY
            self.glyphs = _Glyphs(cmap.__contains__)
        else:
            log.warning("no unicode TTF found; PDF reports fall back to Latin-1 Helvetica")
            self.body_font = "helvetica"
            self.glyphs = _Glyphs(lambda cp: cp < 127 or 160 <= cp < 256)
        self.report_title = self.clean(title)
        self.set_title(self.report_title)
        self.set_creator("jobs-platform REPORT_GENERATION")
        self.set_auto_page_break(auto=True, margin=15)

    def clean(self, text: str) -> str:
        return text.translate(self.glyphs)

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font(self.body_font, size=7)
        self.set_text_color(110)
        self.cell(0, 6, f"{self.report_title} · page {self.page_no()} of {{nb}}", align="C")
        self.set_text_color(0)


def render_pdf(
    payload: ReportPayload, out: IO[bytes], ctx: JobContext, generated_at: datetime
) -> None:
    """A paginated table; text the font lacks is replaced by '?', long cells wrap."""
    pdf = _ReportPDF(payload.title, landscape=len(payload.columns) > 5)
    pdf.add_page()
    pdf.set_font(pdf.body_font, size=16)
    pdf.multi_cell(0, 8, pdf.report_title, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(pdf.body_font, size=8)
    pdf.set_text_color(110)
    generated = pdf.clean(_generated_line(generated_at, len(payload.rows)))
    pdf.cell(0, 6, generated, new_x="LMARGIN", new_y="NEXT")
    pdf.set_text_color(0)
    pdf.ln(2)

    measure = _Measure(pdf)
    headings = [pdf.clean(c) for c in payload.columns]
    sample = [[pdf.clean(format_cell(v)) for v in row] for row in payload.rows[:200]]
    widths = _column_widths(pdf, measure, headings, sample)
    heading_lines = _wrap_row(pdf, measure, headings, widths)
    left = ["L"] * len(widths)
    _draw_row(pdf, measure, heading_lines, widths, left, shaded=True)
    for start in range(0, len(payload.rows), CHUNK_ROWS):
        _checkpoint(ctx, start, len(payload.rows), PDF_ROWS_SHARE)
        for row in payload.rows[start : start + CHUNK_ROWS]:
            lines = _wrap_row(pdf, measure, [pdf.clean(format_cell(v)) for v in row], widths)
            if pdf.will_page_break(_height(lines)):
                pdf.add_page()
                _draw_row(pdf, measure, heading_lines, widths, left, shaded=True)
            aligns = ["R" if _is_number(v) else "L" for v in row]
            _draw_row(pdf, measure, lines, widths, aligns, shaded=False)
    if not payload.rows:
        pdf.cell(0, 8, "No rows.", new_x="LMARGIN", new_y="NEXT")
    _checkpoint(ctx, len(payload.rows), len(payload.rows), PDF_ROWS_SHARE)
    out.write(pdf.output())


class _Measure:
    """Text width at the table's one font size, from cached per-character widths.

    fpdf2's own measuring and line breaking cost tens of microseconds per call;
    a 100k-row report makes millions of them.
    """

    def __init__(self, pdf: FPDF) -> None:
        self._pdf = pdf
        self._widths: dict[str, float] = {}

    def __call__(self, text: str) -> float:
        widths = self._widths
        total = 0.0
        for char in text:
            width = widths.get(char)
            if width is None:
                width = widths[char] = self._pdf.get_string_width(char)
            total += width
        return total


def _column_widths(
    pdf: FPDF, measure: _Measure, headings: list[str], sample: list[list[str]]
) -> list[float]:
    """Widths proportional to each column's widest sampled text, filling the page width."""
    pad = 2 * pdf.c_margin
    floor = min(18.0, pdf.epw / len(headings))  # keeps a short column legible
    widths = []
    for index, heading in enumerate(headings):
        natural = max([measure(heading)] + [measure(row[index]) for row in sample])
        widths.append(min(max(natural + pad, floor), pdf.epw * 0.6))
    scale = pdf.epw / sum(widths)
    return [w * scale for w in widths]


def _wrap_row(
    pdf: FPDF, measure: _Measure, texts: Sequence[str], widths: Sequence[float]
) -> list[list[str]]:
    pad = 2 * pdf.c_margin
    return [_wrap(measure, t, w - pad) for t, w in zip(texts, widths, strict=True)]


def _wrap(measure: _Measure, text: str, width: float) -> list[str]:
    """Greedy word wrap to `width`, breaking over-long words, cut at MAX_CELL_LINES."""
    if measure(text) <= width:
        return [text]
    lines: list[str] = []
    line, line_width, space = "", 0.0, measure(" ")
    for word in text.split(" "):
        word_width = measure(word)
        if line and line_width + space + word_width <= width:
            line, line_width = f"{line} {word}", line_width + space + word_width
            continue
        if line:
            lines.append(line)
        line, line_width = "", 0.0
        for char in word:  # a word wider than the cell is broken anywhere
            char_width = measure(char)
            if line and line_width + char_width > width:
                lines.append(line)
                line, line_width = "", 0.0
            line, line_width = line + char, line_width + char_width
        if len(lines) >= MAX_CELL_LINES:
            break
    lines.append(line)
    if len(lines) > MAX_CELL_LINES:
        last = lines[MAX_CELL_LINES - 1]
        while last and measure(last + "...") > width:
            last = last[:-1]
        lines = [*lines[: MAX_CELL_LINES - 1], last + "..."]
    return lines


def _height(lines: list[list[str]]) -> float:
    return max(len(cell) for cell in lines) * LINE_HEIGHT


def _draw_row(
    pdf: FPDF,
    measure: _Measure,
    lines: list[list[str]],
    widths: list[float],
    aligns: list[str],
    *,
    shaded: bool,
) -> None:
    """Bordered cells drawn with `text()`, about 25 times cheaper than `cell()`."""
    height = _height(lines)
    x, y = pdf.l_margin, pdf.get_y()
    baseline = 0.5 * LINE_HEIGHT + 0.3 * pdf.font_size  # where cell() puts it
    pdf.set_draw_color(170)
    pdf.set_fill_color(230)
    for cell_lines, width, align in zip(lines, widths, aligns, strict=True):
        pdf.rect(x, y, width, height, style="DF" if shaded else "D")
        for number, line in enumerate(cell_lines):
            if not line:
                continue
            text_x = x + pdf.c_margin
            if align == "R":
                text_x = x + width - pdf.c_margin - measure(line)
            pdf.text(text_x, y + number * LINE_HEIGHT + baseline, line)
        x += width
    pdf.set_xy(pdf.l_margin, y + height)


_RENDERERS: dict[str, Callable[[ReportPayload, IO[bytes], JobContext, datetime], None]] = {
    "csv": render_csv,
    "html": render_html,
    "pdf": render_pdf,
}
