"""Job artifacts on disk: one folder per job, written atomically, found again for download.

Layout: `<artifact_dir>/<job_id>/<filename>`. A job's result records the
filename; the API serves it at `/jobs/<job_id>/artifact` under that name, so each
job's file is named after the job (`report-3f2c9a1b.pdf`, see `artifact_name`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from uuid import UUID

#: Content type by file extension; anything else is served as octet-stream.
CONTENT_TYPES = {
    ".csv": "text/csv",
    ".html": "text/html",
    ".pdf": "application/pdf",
    ".jsonl": "application/x-ndjson",
    ".json": "application/json",
}
DEFAULT_CONTENT_TYPE = "application/octet-stream"

# A plain file name: no separators, no leading dot (temp files start with one), bounded length.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TEMP_PREFIX = ".tmp-"
#: Hex digits of the job id in an artifact's name: the prefix `jobs status` also takes.
SHORT_ID_LENGTH = 8
# A spreadsheet runs a cell starting with one of these as a formula (OWASP, CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


@dataclass(frozen=True)
class ArtifactInfo:
    """A stored artifact: where it is, how big, its checksum and what it is."""

    path: Path
    filename: str
    bytes: int
    sha256: str
    content_type: str

    def as_result(self, job_id: UUID | str) -> dict[str, Any]:
        """The artifact part of a job result: name, size, checksum, type and download path."""
        return {
            "artifact": self.filename,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "content_type": self.content_type,
            "location": artifact_location(job_id),
        }


def content_type_for(filename: str) -> str:
    """The content type of a file, by its extension."""
    return CONTENT_TYPES.get(Path(filename).suffix.lower(), DEFAULT_CONTENT_TYPE)


def artifact_location(job_id: UUID | str) -> str:
    """The API path a job's artifact is downloaded from."""
    return f"/jobs/{_job_folder_name(job_id)}/artifact"


def artifact_name(stem: str, job_id: UUID | str, extension: str) -> str:
    """A file name of its own per job, `<stem>-<short job id>.<extension>`.

    Downloads keep this name, so two jobs' files never collide in one folder
    (`curl -OJ` refuses to overwrite), and the short id says which job it came from.
    """
    name = f"{stem}-{_job_folder_name(job_id)[:SHORT_ID_LENGTH]}.{extension}"
    _check_filename(name)
    return name


def csv_safe(text: str) -> str:
    """A CSV cell a spreadsheet shows as text rather than running as a formula.

    A cell starting with `=`, `+`, `-`, `@`, tab or carriage return gets a leading
    `'`, as OWASP recommends; a plain number such as `-5` or `-3.2` cannot run and
    is left as it is.
    """
    if text.startswith(_FORMULA_STARTS) and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def artifact_path(artifact_dir: Path | str, job_id: UUID | str) -> Path:
    """The folder holding a job's artifacts; `job_id` must be a UUID, so it cannot escape."""
    return Path(artifact_dir) / _job_folder_name(job_id)


def write_artifact(
    artifact_dir: Path | str,
    job_id: UUID | str,
    filename: str,
    writer: Callable[[IO[bytes]], Any],
) -> ArtifactInfo:
    """Store what `writer` writes to the binary file it is given as the job's `filename`.

    The bytes go to a temp file in the same folder, are fsynced and then renamed
    over the final name, so a crash or an exception in `writer` never leaves half
    a file where a download would find it. Writing again replaces the artifact,
    which is what a retried attempt wants.
    """
    _check_filename(filename)
    folder = artifact_path(artifact_dir, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=folder)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            writer(out)
            out.flush()
            os.fsync(out.fileno())
        final = folder / filename
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)  # makes the rename itself survive a power cut
    with final.open("rb") as stored:
        # Hash what is on disk rather than what we meant to write.
        digest = hashlib.file_digest(stored, "sha256").hexdigest()
    return ArtifactInfo(
        path=final,
        filename=filename,
        bytes=final.stat().st_size,
        sha256=digest,
        content_type=content_type_for(filename),
    )


def find_artifact(
    artifact_dir: Path | str, job_id: UUID | str, filename: str | None = None
) -> tuple[Path, str] | None:
    """(path, content type) of a job's artifact, or None when there is none.

    `filename` is the one the job's result records; without it the job's folder
    must hold exactly one finished file. Anything that is not a UUID or a plain
    file name answers None, so a crafted id or name cannot reach outside.
    """
    try:
        folder = artifact_path(artifact_dir, job_id)
        if filename is not None:
            _check_filename(filename)
    except ValueError:
        return None
    if filename is None:
        if not folder.is_dir():
            return None
        names = [p.name for p in folder.iterdir() if p.is_file() and _SAFE_NAME.fullmatch(p.name)]
        if len(names) != 1:
            return None
        filename = names[0]
    path = folder / filename
    root = Path(artifact_dir).resolve()
    # Belt and braces: a symlink planted in the folder must not lead elsewhere either.
    if not path.is_file() or not path.resolve().is_relative_to(root):
        return None
    return path, content_type_for(filename)


def delete_artifacts(artifact_dir: Path | str, job_ids: Iterable[UUID | str]) -> int:
    """Remove these jobs' artifact folders; returns how many existed."""
    removed = 0
    for job_id in job_ids:
        folder = artifact_path(artifact_dir, job_id)
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


@contextmanager
def text_writer(binary: IO[bytes], newline: str | None = "") -> Iterator[io.TextIOWrapper]:
    """A UTF-8 text view of `binary` that leaves it open when done (for csv and json)."""
    text = io.TextIOWrapper(binary, encoding="utf-8", newline=newline, write_through=True)
    try:
        yield text
    finally:
        text.flush()
        text.detach()  # closing the wrapper would close `binary` under write_artifact


def _job_folder_name(job_id: UUID | str) -> str:
    try:
        return str(job_id if isinstance(job_id, UUID) else UUID(str(job_id)))
    except ValueError:
        raise ValueError(f"job id must be a UUID, got {str(job_id)[:64]!r}") from None


def _check_filename(filename: str) -> None:
    if not _SAFE_NAME.fullmatch(filename):
        raise ValueError(f"artifact names are plain file names, got {filename[:64]!r}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
