"""Text for people: aligned tables, relative times, progress bars, the watch frame."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

#: Display order of statuses; anything else the API adds is shown after these.
STATUS_ORDER = ("QUEUED", "IN_PROGRESS", "RETRYING", "FAILED", "COMPLETED", "DEAD_LETTER",
                "CANCELLED")
TERMINAL = frozenset({"COMPLETED", "DEAD_LETTER", "CANCELLED"})


# --- time -------------------------------------------------------------------------------

def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 string from the API as an aware datetime (naive means UTC)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def relative(value: Any, now: datetime | None = None) -> str:
    """'12s ago', 'in 3m', '2h ago', '4d ago'; '-' when absent, the text when unparsable."""
    when = parse_time(value)
    if when is None:
        return "-" if value in (None, "") else str(value)
    now = now or datetime.now(UTC)
    seconds = (now - when).total_seconds()
    future = seconds < 0
    span = abs(seconds)
    if span < 1:
        return "now"
    if span < 60:
        text = f"{int(span)}s"
    elif span < 3600:
        text = f"{int(span // 60)}m"
    elif span < 86400:
        text = f"{int(span // 3600)}h"
    else:
        text = f"{int(span // 86400)}d"
    return f"in {text}" if future else f"{text} ago"


def iso_and_relative(value: Any, now: datetime | None = None) -> str:
    if value in (None, ""):
        return "-"
    return f"{value} ({relative(value, now)})"


# --- tables -----------------------------------------------------------------------------

def width(text: str) -> int:
    """Columns `text` takes in a terminal (wide East Asian characters count twice)."""
    return sum(0 if unicodedata.combining(c) else
               2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` columns, with an ellipsis when cut."""
    if width(text) <= limit:
        return text
    out, used = [], 0
    for char in text:
        w = width(char)
        if used + w > limit - 1:
            break
        out.append(char)
        used += w
    return "".join(out) + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *,
          right: Sequence[int] = (), max_widths: dict[int, int] | None = None) -> str:
    """Columns aligned with two spaces between them; `right` lists right-aligned columns."""
    cells = [[one_cell(v) for v in row] for row in rows]
    if max_widths:
        cells = [[clip(c, max_widths[i]) if i in max_widths else c for i, c in enumerate(row)]
                 for row in cells]
    widths = [width(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], width(cell))
    lines = []
    for row in [list(headers), *cells]:
        parts = []
        for i, cell in enumerate(row):
            pad = " " * (widths[i] - width(cell))
            parts.append(pad + cell if i in right else cell + pad)
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def one_cell(value: Any) -> str:
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return re.sub(r"\s*[\r\n\t\v\f]+\s*", " ", text).strip()


def short_id(value: Any, full: bool = False) -> str:
    text = "-" if value is None else str(value)
    return text if full else text[:8]


def status_order(statuses: Any) -> list[str]:
    known = [s for s in STATUS_ORDER if s in statuses]
    return known + sorted(s for s in statuses if s not in STATUS_ORDER)


# --- jobs -------------------------------------------------------------------------------

def progress_bar(fraction: Any, cells: int = 20, *, ascii_only: bool = False) -> str:
    """`[#########-----------]  45%` for 0..1; '' when there is no progress to show."""
    if not isinstance(fraction, int | float) or isinstance(fraction, bool):
        return ""
    frac = min(max(float(fraction), 0.0), 1.0)
    filled = int(round(frac * cells))
    full, empty = ("#", "-") if ascii_only else ("█", "░")
    return f"[{full * filled}{empty * (cells - filled)}] {int(frac * 100):3d}%"


def retries_cell(job: dict[str, Any]) -> str:
    return f"{job.get('retries', '-')}/{job.get('max_retries', '-')}"


def progress_cell(job: dict[str, Any], ascii_only: bool = False) -> str:
    if job.get("progress") is None:
        return "-"
    return progress_bar(job["progress"], 10, ascii_only=ascii_only)


def jobs_table(jobs: Sequence[dict[str, Any]], *, full_ids: bool = False,
               now: datetime | None = None, ascii_only: bool = False) -> str:
    show_progress = any(j.get("progress") is not None for j in jobs)
    headers = ["ID", "TYPE", "STATUS", "ATTEMPTS", "RETRIES", "CREATED", "UPDATED"]
    if show_progress:
        headers.append("PROGRESS")
    rows = []
    for job in jobs:
        row = [short_id(job.get("job_id"), full_ids), job.get("job_type"), job.get("status"),
               str(job.get("attempts", "-")), retries_cell(job),
               relative(job.get("created_at"), now), relative(job.get("updated_at"), now)]
        if show_progress:
            row.append(progress_cell(job, ascii_only))
        rows.append(row)
    return table(headers, rows, right=(3, 4), max_widths={1: 30})


def dead_letters_table(items: Sequence[dict[str, Any]], *, full_ids: bool = False,
                       now: datetime | None = None) -> str:
    headers = ["JOB", "TYPE", "REASON", "ATTEMPTS", "DEAD-LETTERED", "REPLAYED", "LAST ERROR"]
    rows = [[short_id(d.get("job_id"), full_ids), d.get("job_type"), d.get("reason"),
             str(d.get("attempts", "-")), relative(d.get("dead_lettered_at"), now),
             relative(d.get("replayed_at"), now) if d.get("replayed_at") else "-",
             d.get("last_error")] for d in items]
    return table(headers, rows, right=(3,), max_widths={1: 24, 2: 24, 6: 60})


def callbacks_table(items: Sequence[dict[str, Any]], *, now: datetime | None = None) -> str:
    """A job's callback deliveries: one row per try (a delivery not yet tried: one row)."""
    headers = ["EVENT", "STATE", "TRY", "AT", "ANSWER", "MS", "URL"]
    rows = []
    for d in items:
        for a in d.get("attempts") or [{}]:
            answer = a.get("error") or (str(a["status_code"]) if a.get("status_code") else "-")
            rows.append([d.get("event_type"), d.get("state"), str(a.get("attempt", "-")),
                         relative(a.get("started_at"), now) if a.get("started_at") else "-",
                         answer, f"{a['duration_ms']:.0f}" if "duration_ms" in a else "-",
                         d.get("url")])
    return table(headers, rows, right=(2, 5), max_widths={4: 40, 6: 60})


def tokens_table(items: Sequence[dict[str, Any]], *, now: datetime | None = None) -> str:
    """API tokens with whole ids (revoke needs one), scopes and relative times."""
    now = now or datetime.now(UTC)
    rows = []
    for t in items:
        expires = parse_time(t.get("expires_at"))
        if t.get("expires_at") is None:
            expiry = "never"
        elif expires is not None and expires <= now:
            expiry = f"expired {relative(t['expires_at'], now)}"
        else:
            expiry = relative(t.get("expires_at"), now)
        rows.append([t.get("id"), t.get("name"), ",".join(t.get("scopes") or []),
                     relative(t.get("created_at"), now),
                     relative(t.get("last_used_at"), now) if t.get("last_used_at") else "never",
                     expiry])
    return table(["ID", "NAME", "SCOPES", "CREATED", "LAST USED", "EXPIRES"], rows,
                 max_widths={1: 30})


def schedule_when(doc: dict[str, Any]) -> str:
    """`every 2s`, or `cron '0 9 * * *' (Europe/Berlin)`."""
    if doc.get("every_seconds") is not None:
        return f"every {doc['every_seconds']}s"
    return f"cron '{doc.get('cron')}' ({doc.get('timezone') or 'UTC'})"


def schedules_table(items: Sequence[dict[str, Any]], *, now: datetime | None = None) -> str:
    """Schedules with when they tick, their state, next and last runs and last job."""
    rows = [[d.get("name"), d.get("job_type"), schedule_when(d),
             "paused" if d.get("paused") else "active",
             relative(d.get("next_run_at"), now), relative(d.get("last_run_at"), now),
             short_id(d.get("last_job_id"))] for d in items]
    return table(["NAME", "TYPE", "WHEN", "STATE", "NEXT RUN", "LAST RUN", "LAST JOB"], rows,
                 max_widths={0: 40, 1: 30})


def schedule_detail(doc: dict[str, Any], now: datetime | None = None) -> str:
    """A schedule as 'Label: value' lines, times as ISO plus relative."""
    rows = [("Schedule", str(doc.get("name"))), ("Id", str(doc.get("schedule_id"))),
            ("Type", str(doc.get("job_type"))), ("When", schedule_when(doc)),
            ("State", ("paused" + (f" ({doc['paused_reason']})" if doc.get("paused_reason")
                                   else "")) if doc.get("paused") else "active"),
            ("Next run", iso_and_relative(doc.get("next_run_at"), now)),
            ("Last run", iso_and_relative(doc.get("last_run_at"), now)),
            ("Last job", str(doc.get("last_job_id") or "-")),
            ("Max retries", one_cell(doc.get("max_retries"))),
            ("Created", f"{iso_and_relative(doc.get('created_at'), now)} by"
                        f" {doc.get('created_by') or '-'}"),
            ("Payload", json.dumps(doc.get("payload"), ensure_ascii=False))]
    label_width = max(len(label) for label, _ in rows) + 1
    return "\n".join(f"{(label + ':').ljust(label_width)} {value}" for label, value in rows)


#: Fields `job_detail` shows in its own way; any other field is listed after them.
_DETAIL_FIELDS = ("job_id", "job_type", "status", "attempts", "retries", "max_retries",
                  "progress", "progress_message", "cancel_requested", "run_at",
                  "next_attempt_at", "created_at", "updated_at", "version", "payload",
                  "result", "error_message", "depends_on", "cancelled_by", "callback_url")


def job_detail(job: dict[str, Any], now: datetime | None = None,
               ascii_only: bool = False) -> str:
    """A job document as 'Label: value' lines, full id, times as ISO plus relative."""
    rows: list[tuple[str, str]] = [
        ("Job", str(job.get("job_id"))),
        ("Type", str(job.get("job_type"))),
        ("Status", str(job.get("status")) + ("  (cancel requested)"
                                             if _cancel_pending(job) else "")),
        ("Attempts", str(job.get("attempts", "-"))),
        ("Retries", retries_cell(job)),
    ]
    if job.get("progress") is not None or job.get("progress_message"):
        bar = progress_bar(job.get("progress"), ascii_only=ascii_only)
        rows.append(("Progress", " ".join(p for p in (bar, job.get("progress_message") or "")
                                          if p)))
    for label, key in (("Run at", "run_at"), ("Next attempt", "next_attempt_at")):
        if job.get(key):
            rows.append((label, iso_and_relative(job[key], now)))
    rows += [("Created", iso_and_relative(job.get("created_at"), now)),
             ("Updated", iso_and_relative(job.get("updated_at"), now)),
             ("Version", str(job.get("version", "-"))),
             ("Payload", json.dumps(job.get("payload"), ensure_ascii=False))]
    if job.get("result") is not None:
        rows.append(("Result", json.dumps(job["result"], ensure_ascii=False)))
    if job.get("error_message"):
        rows.append(("Error", one_cell(job["error_message"])))
    if job.get("depends_on"):
        rows.append(("Depends on", ", ".join(map(str, job["depends_on"]))))
    if job.get("cancelled_by"):
        rows.append(("Cancelled by", f"{job['cancelled_by']} (a parent that did not complete)"))
    if job.get("callback_url"):
        rows.append(("Callback", str(job["callback_url"])))
    for key, value in job.items():
        if key not in _DETAIL_FIELDS:
            rows.append((key, one_cell(value)))
    label_width = max(len(label) for label, _ in rows) + 1
    return "\n".join(f"{(label + ':').ljust(label_width)} {value}" for label, value in rows)


def _cancel_pending(job: dict[str, Any]) -> bool:
    return bool(job.get("cancel_requested")) and job.get("status") not in TERMINAL


def wait_line(job: dict[str, Any], elapsed: float, ascii_only: bool = False) -> str:
    """The one-line live state of a job for `submit --wait`."""
    parts = [short_id(job.get("job_id")), str(job.get("job_type")),
             f"{job.get('status')}{' (cancel requested)' if _cancel_pending(job) else ''}",
             f"attempt {job.get('attempts', 0)}", f"retries {retries_cell(job)}"]
    bar = progress_bar(job.get("progress"), ascii_only=ascii_only)
    if bar:
        parts.append(bar)
    if job.get("progress_message"):
        parts.append(one_cell(job["progress_message"]))
    parts.append(f"{elapsed:.1f}s")
    return "  ".join(parts)


# --- watch ------------------------------------------------------------------------------

def stats_frame(stats: dict[str, Any], *, url: str, now: datetime | None = None,
                recent_limit: int = 10, ascii_only: bool = False,
                footer: str | None = None) -> str:
    """One screen of `jobs watch`: counts per status and per type, throughput, recent jobs."""
    now = now or datetime.now(UTC)
    counts = stats.get("counts") or {}
    out = [f"jobs at {url}   {now.astimezone().strftime('%Y-%m-%d %H:%M:%S')}"
           + (f"   {footer}" if footer else ""), ""]

    statuses = status_order(set(STATUS_ORDER[:6]) | set(counts))
    rows = [[s, str(counts.get(s, 0))] for s in statuses]
    rows.append(["TOTAL", str(sum(v for v in counts.values() if isinstance(v, int)))])
    out += [table(["STATUS", "COUNT"], rows, right=(1,)), ""]

    by_type = stats.get("by_type") or {}
    if by_type:
        columns = status_order({s for per in by_type.values() for s in per})
        type_rows = [[name, *(str(per.get(s, 0)) for s in columns),
                      str(sum(v for v in per.values() if isinstance(v, int)))]
                     for name, per in sorted(by_type.items())]
        out += [table(["TYPE", *columns, "TOTAL"], type_rows,
                      right=tuple(range(1, len(columns) + 2)), max_widths={0: 30}), ""]

    throughput = stats.get("throughput") or []
    if throughput:
        last = throughput[-10:]
        peak = max([1] + [int(p.get("completed") or 0) + int(p.get("failed") or 0)
                          for p in last])
        mark = "#" if ascii_only else "█"
        rows = []
        for point in last:
            done, failed = int(point.get("completed") or 0), int(point.get("failed") or 0)
            when = parse_time(point.get("minute"))
            label = when.astimezone().strftime("%H:%M") if when else str(point.get("minute"))
            rows.append([label, str(done), str(failed), mark * round(20 * (done + failed) / peak)])
        out += ["Throughput per minute",
                table(["MINUTE", "COMPLETED", "FAILED", ""], rows, right=(1, 2)), ""]

    recent = (stats.get("recent") or [])[:recent_limit]
    out.append("Recent jobs")
    out.append(jobs_table(recent, now=now, ascii_only=ascii_only) if recent else "  (none)")
    return "\n".join(out)
