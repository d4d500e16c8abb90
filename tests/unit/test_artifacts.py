"""Artifacts are written whole or not at all, and downloads cannot leave the artifact folder."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import IO

import pytest

from common.artifacts import (
    artifact_location,
    artifact_name,
    artifact_path,
    content_type_for,
    csv_safe,
    find_artifact,
    write_artifact,
)


def _write(data: bytes):
    def writer(out: IO[bytes]) -> None:
        out.write(data)

    return writer


def _failing_after(data: bytes):
    def writer(out: IO[bytes]) -> None:
        out.write(data)
        raise RuntimeError("disk on fire")

    return writer


def test_an_artifact_is_stored_with_its_size_checksum_and_content_type(tmp_path: Path) -> None:
    job_id = uuid.uuid4()
    info = write_artifact(tmp_path, job_id, "report.csv", _write(b"a,b\n1,2\n"))

    assert info.path == tmp_path / str(job_id) / "report.csv"
    assert info.path.read_bytes() == b"a,b\n1,2\n"
    assert info.bytes == 8
    assert info.sha256 == hashlib.sha256(b"a,b\n1,2\n").hexdigest()
    assert info.content_type == "text/csv"
    assert info.as_result(job_id) == {
        "artifact": "report.csv",
        "bytes": 8,
        "sha256": info.sha256,
        "content_type": "text/csv",
        "location": f"/jobs/{job_id}/artifact",
    }


def test_a_writer_that_fails_leaves_no_file_at_all(tmp_path: Path) -> None:
    job_id = uuid.uuid4()
    with pytest.raises(RuntimeError):
        write_artifact(tmp_path, job_id, "report.pdf", _failing_after(b"%PDF-half"))

    assert list(artifact_path(tmp_path, job_id).iterdir()) == []
    assert find_artifact(tmp_path, job_id) is None


def test_a_failed_rewrite_keeps_the_previous_artifact_intact(tmp_path: Path) -> None:
    job_id = uuid.uuid4()
    write_artifact(tmp_path, job_id, "export.jsonl", _write(b'{"n":1}\n'))
    with pytest.raises(RuntimeError):
        write_artifact(tmp_path, job_id, "export.jsonl", _failing_after(b'{"n":'))

    found = find_artifact(tmp_path, job_id)
    assert found is not None
    assert found[0].read_bytes() == b'{"n":1}\n'
    assert os.listdir(artifact_path(tmp_path, job_id)) == ["export.jsonl"]


def test_a_successful_rewrite_replaces_the_artifact(tmp_path: Path) -> None:
    job_id = uuid.uuid4()
    write_artifact(tmp_path, job_id, "report.html", _write(b"old"))
    info = write_artifact(tmp_path, job_id, "report.html", _write(b"new!"))

    assert info.path.read_bytes() == b"new!"
    assert info.bytes == 4


def test_find_artifact_answers_the_path_and_content_type(tmp_path: Path) -> None:
    job_id = uuid.uuid4()
    info = write_artifact(tmp_path, job_id, "jobs.jsonl", _write(b"{}\n"))

    assert find_artifact(tmp_path, job_id) == (info.path, "application/x-ndjson")
    assert find_artifact(tmp_path, str(job_id), "jobs.jsonl") == (info.path, "application/x-ndjson")
    assert find_artifact(tmp_path, job_id, "other.csv") is None
    assert find_artifact(tmp_path, uuid.uuid4()) is None


@pytest.mark.parametrize(
    ("filename", "content_type"),
    [
        ("report.csv", "text/csv"),
        ("report.html", "text/html"),
        ("report.PDF", "application/pdf"),
        ("jobs.jsonl", "application/x-ndjson"),
        ("result.json", "application/json"),
        ("blob.bin", "application/octet-stream"),
    ],
)
def test_the_content_type_follows_the_extension(filename: str, content_type: str) -> None:
    assert content_type_for(filename) == content_type


@pytest.mark.parametrize(
    "filename", ["../escape.csv", "a/b.csv", "..", ".hidden", "", "x" * 200, "a\\b.csv"]
)
def test_writing_outside_the_job_folder_is_refused(tmp_path: Path, filename: str) -> None:
    with pytest.raises(ValueError):
        write_artifact(tmp_path, uuid.uuid4(), filename, _write(b"x"))


@pytest.mark.parametrize("job_id", ["../..", "..", "/etc", "not-a-uuid", ""])
def test_a_job_id_that_is_not_a_uuid_finds_nothing(tmp_path: Path, job_id: str) -> None:
    assert find_artifact(tmp_path, job_id) is None
    with pytest.raises(ValueError):
        artifact_path(tmp_path, job_id)
    with pytest.raises(ValueError):
        artifact_location(job_id)


@pytest.mark.parametrize("filename", ["../../secret.txt", "../secret.txt", "/etc/passwd", ".."])
def test_a_traversing_filename_finds_nothing(tmp_path: Path, filename: str) -> None:
    (tmp_path / "secret.txt").write_text("top secret")
    job_id = uuid.uuid4()
    write_artifact(tmp_path, job_id, "report.csv", _write(b"ok"))

    assert find_artifact(tmp_path, job_id, filename) is None


def test_a_symlink_planted_in_the_job_folder_is_not_followed_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    root = tmp_path / "artifacts"
    job_id = uuid.uuid4()
    folder = artifact_path(root, job_id)
    folder.mkdir(parents=True)
    (folder / "report.csv").symlink_to(outside)

    assert find_artifact(root, job_id) is None
    assert find_artifact(root, job_id, "report.csv") is None


def test_an_artifact_name_carries_the_short_job_id_so_two_jobs_never_share_one() -> None:
    first = uuid.UUID("3f2c9a1b-0000-4000-8000-000000000001")
    second = uuid.UUID("7d41e0c2-0000-4000-8000-000000000002")

    assert artifact_name("report", first, "pdf") == "report-3f2c9a1b.pdf"
    assert artifact_name("report", str(second), "pdf") == "report-7d41e0c2.pdf"
    assert artifact_name("jobs", first, "jsonl") == "jobs-3f2c9a1b.jsonl"
    with pytest.raises(ValueError):
        artifact_name("report", "../..", "pdf")
    with pytest.raises(ValueError):
        artifact_name("../report", first, "pdf")


def test_an_artifact_is_found_again_and_downloads_under_its_own_name(tmp_path: Path) -> None:
    job_id = uuid.uuid4()
    name = artifact_name("report", job_id, "pdf")
    info = write_artifact(tmp_path, job_id, name, _write(b"%PDF-1.7"))

    found = find_artifact(tmp_path, str(job_id), name)

    assert found == (info.path, "application/pdf")
    # The status function serves the file as `download_name=path.name`.
    assert found[0].name == f"report-{str(job_id)[:8]}.pdf"


@pytest.mark.parametrize(
    ("cell", "written"),
    [
        ("=1+1", "'=1+1"),
        ('=HYPERLINK("http://evil","x")', '\'=HYPERLINK("http://evil","x")'),
        ("+1+2", "'+1+2"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1:A2)", "'@SUM(A1:A2)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("-", "'-"),
        ("-5", "-5"),
        ("-3.2", "-3.2"),
        ("+7", "+7"),
        ("-1e5", "-1e5"),
        ("plain", "plain"),
        ("a=b", "a=b"),
        ("", ""),
    ],
)
def test_a_csv_cell_that_would_run_as_a_formula_is_prefixed_but_a_number_is_not(
    cell: str, written: str
) -> None:
    assert csv_safe(cell) == written


# -- object storage (fsspec) ------------------------------------------------------------


def test_object_storage_writes_whole_objects_and_finds_opens_and_deletes_them():
    import fsspec

    from common.artifacts import delete_artifacts, open_artifact

    store = f"memory://unit-{uuid.uuid4().hex[:8]}/prefix"
    job = str(uuid.uuid4())
    info = write_artifact(store, job, "out.csv", lambda f: f.write(b"a,b\n1,2\n"))
    assert info.path == f"{store}/{job}/out.csv" and info.bytes == 8
    assert info.sha256 == hashlib.sha256(b"a,b\n1,2\n").hexdigest()
    assert find_artifact(store, job, "out.csv") == (info.path, "text/csv")
    assert find_artifact(store, job) == (info.path, "text/csv")  # the only file
    assert find_artifact(store, job, "other.csv") is None
    assert find_artifact(store, "not-a-uuid", "out.csv") is None
    with open_artifact(str(info.path)) as stored:
        assert stored.read() == b"a,b\n1,2\n"

    def broken(f):
        f.write(b"half")
        raise RuntimeError("the writer failed")

    with pytest.raises(RuntimeError):
        write_artifact(store, job, "half.csv", broken)
    assert not fsspec.filesystem("memory").exists(f"{store[9:]}/{job}/half.csv")
    assert delete_artifacts(store, [job, str(uuid.uuid4())]) == 1
    assert find_artifact(store, job, "out.csv") is None


def test_a_file_url_is_the_local_folder(tmp_path):
    job = str(uuid.uuid4())
    info = write_artifact(tmp_path.as_uri(), job, "out.txt", lambda f: f.write(b"x"))
    assert info.path == tmp_path / job / "out.txt"
    assert find_artifact(str(tmp_path), job, "out.txt") == (info.path, "application/octet-stream")


@pytest.mark.parametrize("url,says", [
    ("ftp://host/artifacts", "the scheme must be file, gs, s3 or memory"),
    ("file://relative/path", "needs an absolute path"),
])
def test_an_artifact_url_that_cannot_work_is_refused_at_start(url, says):
    from common.settings import load_settings

    with pytest.raises(ValueError, match=says):
        load_settings({"JOBS_ARTIFACT_URL": url})


def test_object_storage_without_its_library_is_an_error_naming_the_extra():
    from common.settings import load_settings

    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"needs gcsfs \(extra: gcs\)"):
            load_settings({"JOBS_ARTIFACT_URL": "gs://bucket/artifacts"})
    else:  # installed: the URL is accepted as it is
        assert load_settings({"JOBS_ARTIFACT_URL": "gs://b/a"}).artifact_store == "gs://b/a"
