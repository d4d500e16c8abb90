"""Job artifacts: one folder per job, written atomically, found again for download.

Layout: `<store>/<job_id>/<filename>`. A job's result records the filename; the API
serves it at `/jobs/<job_id>/artifact` under that name, so each job's file is named after
the job (`report-3f2c9a1b.pdf`, see `artifact_name`).

The store (`JOBS_ARTIFACT_URL`, or the folder `JOBS_ARTIFACT_DIR`) is a local folder
(a path or `file:///...`: written to a temp file, fsynced and renamed) or object storage
through fsspec: `gs://bucket/prefix` (gcsfs), `s3://bucket/prefix` (s3fs), `memory://...`
(tests). An object is uploaded once complete from a local temp file, so it is never seen
half written either.
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
from functools import cache
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit
from uuid import UUID

#: A store: a local folder, or a URL (file, gs, s3, memory).
Store = Path | str
#: Object-storage protocols and the package each needs (`pip install -e '.[gcs]'`, ...).
REMOTE_PROTOCOLS = {"gs": "gcsfs (extra: gcs)", "gcs": "gcsfs (extra: gcs)",
                    "s3": "s3fs (extra: s3)", "memory": "fsspec"}

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

    path: Path | str  # a local path, or the object's URL
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


def check_store(store: Store) -> None:
    """ValueError unless `store` is a folder or a URL this module can write to; an object
    store's library must be installed (no silent fallback to a local folder)."""
    text = str(store)
    if "://" not in text:
        return
    protocol = text.split("://", 1)[0].lower()
    if protocol == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"a file:// artifact URL needs an absolute path on this"
                             f" machine (file:///data/artifacts): {text!r}")
        return
    if protocol not in REMOTE_PROTOCOLS:
        raise ValueError(f"artifact store {text!r}: the scheme must be file, gs, s3 or memory")
    try:
        _filesystem(protocol)
    except ImportError as exc:
        raise ValueError(f"artifact store {text!r} needs {REMOTE_PROTOCOLS[protocol]}:"
                         f" {exc}") from exc


@cache
def _filesystem(protocol: str) -> Any:
    import fsspec

    return fsspec.filesystem(protocol)


def _remote(store: Store) -> tuple[Any, str, str] | None:
    """(filesystem, root path, protocol) of an object store; None for a local folder."""
    text = str(store)
    if "://" not in text or text.lower().startswith("file://"):
        return None
    protocol, rest = text.split("://", 1)
    return _filesystem(protocol.lower()), rest.rstrip("/"), protocol.lower()


def _local_dir(store: Store) -> Path:
    text = str(store)
    if text.lower().startswith("file://"):
        return Path(unquote(urlsplit(text).path))
    return Path(store)


def artifact_path(artifact_dir: Store, job_id: UUID | str) -> Path:
    """The local folder holding a job's artifacts; `job_id` must be a UUID, so it cannot
    escape."""
    return _local_dir(artifact_dir) / _job_folder_name(job_id)


def _write_remote(remote: tuple[Any, str, str], job_id: UUID | str, filename: str,
                  writer: Callable[[IO[bytes]], Any]) -> ArtifactInfo:
    fs, root, protocol = remote
    with tempfile.NamedTemporaryFile(prefix=_TEMP_PREFIX) as out:
        writer(out)
        out.flush()
        size = out.tell()
        out.seek(0)
        digest = hashlib.file_digest(out, "sha256").hexdigest()
        key = f"{root}/{_job_folder_name(job_id)}/{filename}"
        fs.put_file(out.name, key)  # the object appears only once whole
    return ArtifactInfo(path=f"{protocol}://{key}", filename=filename, bytes=size,
                        sha256=digest, content_type=content_type_for(filename))


def write_artifact(
    artifact_dir: Store,
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
    remote = _remote(artifact_dir)
    if remote is not None:
        return _write_remote(remote, job_id, filename, writer)
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
    artifact_dir: Store, job_id: UUID | str, filename: str | None = None
) -> tuple[Path | str, str] | None:
    """(local path or object URL, content type) of a job's artifact, or None when there is
    none.

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
    remote = _remote(artifact_dir)
    if remote is not None:
        fs, root, protocol = remote
        prefix = f"{root}/{_job_folder_name(job_id)}"
        if filename is None:
            found = [p.rsplit("/", 1)[-1] for p in fs.ls(prefix, detail=False)] \
                if fs.exists(prefix) else []
            names = [n for n in found if _SAFE_NAME.fullmatch(n)]
            if len(names) != 1:
                return None
            filename = names[0]
        key = f"{prefix}/{filename}"
        return (f"{protocol}://{key}", content_type_for(filename)) if fs.isfile(key) else None
    if filename is None:
        if not folder.is_dir():
            return None
        names = [p.name for p in folder.iterdir() if p.is_file() and _SAFE_NAME.fullmatch(p.name)]
        if len(names) != 1:
            return None
        filename = names[0]
    path = folder / filename
    top = _local_dir(artifact_dir).resolve()
    # Belt and braces: a symlink planted in the folder must not lead elsewhere either.
    if not path.is_file() or not path.resolve().is_relative_to(top):
        return None
    return path, content_type_for(filename)


def open_artifact(url: str) -> IO[bytes]:
    """A stored object (a URL `find_artifact` answered), open for reading."""
    fs, key, _ = _remote(url) or (None, "", "")
    if fs is None:
        raise ValueError(f"{url!r} is not in an object store")
    return fs.open(key, "rb")


def delete_artifacts(artifact_dir: Store, job_ids: Iterable[UUID | str]) -> int:
    """Remove these jobs' artifact folders; returns how many existed."""
    removed = 0
    remote = _remote(artifact_dir)
    if remote is not None:
        fs, root, _ = remote
        for job_id in job_ids:
            prefix = f"{root}/{_job_folder_name(job_id)}"
            if fs.exists(prefix):
                fs.rm(prefix, recursive=True)
                removed += 1
        return removed
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
