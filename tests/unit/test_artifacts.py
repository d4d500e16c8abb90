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
    artifact_path,
    content_type_for,
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
