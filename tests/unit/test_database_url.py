"""DATABASE_URL is read as libpq reads it, and nothing in it is ever silently ignored."""

from __future__ import annotations

import ssl

import pytest

from common.db import connect_kwargs


def test_a_plain_url_gives_host_port_user_and_database():
    kwargs = connect_kwargs("postgresql://app:s%40cret@db.example:6543/jobs")
    assert (kwargs["host"], kwargs["port"], kwargs["user"], kwargs["password"],
            kwargs["database"]) == ("db.example", 6543, "app", "s@cret", "jobs")
    assert "ssl_context" not in kwargs


@pytest.mark.parametrize("param", ["sslmode=prefer", "sslmode=allow", "sslmode=verify_full",
                                   "sslmode=", "target_session_attrs=any", "sslcrl=x",
                                   "gssencmode=disable"])
def test_an_unknown_or_unsupported_parameter_is_an_error_not_plaintext(param):
    with pytest.raises(ValueError, match="DATABASE_URL"):
        connect_kwargs(f"postgresql://u@db/jobs?{param}")


def test_sslmode_require_encrypts_without_verifying_the_server():
    context = connect_kwargs("postgresql://u@db/jobs?sslmode=require")["ssl_context"]
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname


def test_sslmode_verify_full_checks_the_chain_and_the_host_name():
    context = connect_kwargs("postgresql://u@db/jobs?sslmode=verify-full")["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_sslmode_verify_ca_checks_the_chain_but_not_the_host_name():
    context = connect_kwargs("postgresql://u@db/jobs?sslmode=verify-ca")["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and not context.check_hostname


def test_a_missing_root_certificate_file_is_an_error_at_start(tmp_path):
    with pytest.raises(OSError):
        connect_kwargs(f"postgresql://u@db/jobs?sslmode=verify-full"
                       f"&sslrootcert={tmp_path / 'nope.pem'}")


def test_a_certificate_file_with_sslmode_disable_is_an_error():
    with pytest.raises(ValueError, match="sslmode=disable"):
        connect_kwargs("postgresql://u@db/jobs?sslrootcert=/etc/ssl/ca.pem")


def test_a_cloud_sql_socket_directory_becomes_a_unix_socket_not_localhost():
    kwargs = connect_kwargs("postgresql://u:p@/jobs?host=/cloudsql/proj:region:inst")
    assert kwargs["unix_sock"] == "/cloudsql/proj:region:inst/.s.PGSQL.5432"
    assert "host" not in kwargs


def test_a_password_never_appears_in_the_error():
    with pytest.raises(ValueError) as caught:
        connect_kwargs("mysql://u:hunter2@db/jobs")
    assert "hunter2" not in str(caught.value)
