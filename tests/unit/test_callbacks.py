"""Callback URL checks, address refusals after resolution, and signatures (pure logic)."""

from __future__ import annotations

import http.server
import re
import socket
import threading
import time

import pytest

from common import callbacks
from common.errors import ApiError
from common.models import shown_url
from common.settings import describe_error, load_settings


def settings(**env: str):
    return load_settings({"JOBS_CALLBACK_SECRET": "s3cret-of-16-chars-or-more", **env})


@pytest.mark.parametrize(("url", "shown"), [
    ("https://hooks.slack.com/services/T0/B0/secret", "https://hooks.slack.com/…"),
    ("http://127.0.0.1:9999/hook?token=abc", "http://127.0.0.1:9999/…"),
    ("http://[::1]:8080?x=1", "http://[::1]:8080/…"),
    ("https://hooks.example.com/", "https://hooks.example.com/"),
    ("https://hooks.example.com", "https://hooks.example.com/"), (None, None)])
def test_readers_see_a_callback_urls_origin_never_its_path_or_query(url, shown):
    assert shown_url(url) == shown


def test_no_secret_means_no_callbacks():
    with pytest.raises(ApiError) as err:
        callbacks.check_url("http://127.0.0.1/x", load_settings(
            {"JOBS_CALLBACK_ALLOWED_HOSTS": "127.0.0.1"}))
    assert err.value.status == 422 and "JOBS_CALLBACK_SECRET" in err.value.detail


def test_only_listed_hosts_and_ports_are_allowed():
    s = settings(JOBS_CALLBACK_ALLOWED_HOSTS="hooks.example.com, 127.0.0.1:9999")
    assert callbacks.check_url("https://hooks.example.com/a?b=1", s)
    assert callbacks.check_url("http://HOOKS.example.com:8080/", s)  # any port of a bare host
    assert callbacks.check_url("http://127.0.0.1:9999/hook", s)
    for url in ("http://127.0.0.1:9998/hook", "http://127.0.0.1/hook", "http://evil.com/"):
        with pytest.raises(ApiError) as err:
            callbacks.check_url(url, s)
        assert "not in JOBS_CALLBACK_ALLOWED_HOSTS" in err.value.detail
        assert "hooks.example.com" not in err.value.detail  # the list is not shown


def test_ipv6_hosts_are_listed_bare_or_bracketed_with_a_port():
    s = settings(JOBS_CALLBACK_ALLOWED_HOSTS="::1, [fd00::5]:9999")
    assert callbacks.check_url("http://[::1]:8080/hook", s)
    assert callbacks.check_url("http://[fd00::5]:9999/hook", s)
    with pytest.raises(ApiError) as err:
        callbacks.check_url("http://[fd00::5]:9998/hook", s)
    assert "host [fd00::5]:9998 is not in" in err.value.detail


def test_an_ipv6_host_matches_however_either_side_spells_it():
    s = settings(JOBS_CALLBACK_ALLOWED_HOSTS="[0:0::1], [FD00:0:0::5]:09999, Hooks.Example.com:080")
    assert s.callback_allowed_hosts == ("::1", "[fd00::5]:9999", "hooks.example.com:80")
    assert callbacks.check_url("http://[0::1]:8080/hook", s)
    assert callbacks.check_url("http://[fd00::0005]:9999/hook", s)
    with pytest.raises(ApiError, match="not in"):
        callbacks.check_url("http://[fd00::5]:80/hook", s)


@pytest.mark.parametrize("entry", [
    "[::1", "[::1]x", "[hooks.example.com]:80", "host:port", "127.0.0.1:0", "127.0.0.1:70000",
    "a b", "user@host", "*.example.com", "[127.0.0.1]:80", "fe80::1%eth0", "a:b:c",
    "[a:b]:80", "example.com.", "127.0.0.1:\u0668\u0660", "a\tb"])
def test_a_malformed_allowed_host_is_refused_at_start(entry):
    with pytest.raises(ValueError, match="JOBS_CALLBACK_ALLOWED_HOSTS"):
        load_settings({"JOBS_CALLBACK_ALLOWED_HOSTS": f"ok.example.com,{entry}"})


def test_port_zero_is_refused_not_taken_for_the_default():
    s = settings(JOBS_CALLBACK_ALLOWED_HOSTS="127.0.0.1")
    with pytest.raises(ApiError) as err:
        callbacks.check_url("http://127.0.0.1:0/hook", s)
    assert "port 0" in err.value.detail


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest", "http://[fd00:ec2::254]/", "http://169.254.1.1/",
    "http://[::ffff:169.254.169.254]/", "http://metadata.google.internal/",
    "http://[fe80::1%25eth0]/", "http://[64:ff9b::a9fe:a9fe]/", "http://[::a9fe:a9fe]/"])
def test_metadata_and_link_local_addresses_are_refused_even_when_listed(url):
    # Everything the setting takes (a link-local entry is refused at start: see below).
    s = settings(JOBS_CALLBACK_ALLOWED_HOSTS="fd00:ec2::254,::ffff:169.254.169.254,"
                 "metadata.google.internal,64:ff9b::a9fe:a9fe,::a9fe:a9fe")
    with pytest.raises(ApiError) as err:
        callbacks.check_url(url, s)
    assert "metadata" in err.value.detail or "link-local" in err.value.detail


def test_a_name_resolving_to_a_metadata_address_is_refused_at_delivery(monkeypatch):
    def fake(host, port, type=0):  # noqa: A002 - socket.getaddrinfo's own name
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with pytest.raises(callbacks.Refused, match="metadata"):
        callbacks.post("http://allowed.example/hook", {}, b"{}", timeout=1)


def test_a_signature_verifies_only_with_the_secret_the_body_and_a_recent_time():
    body = b'{"a": 1}'
    now = int(time.time())
    header = callbacks.sign("k", now, body)
    assert header.startswith(f"t={now},v1=")
    assert callbacks.verify("k", header, body)
    assert not callbacks.verify("k2", header, body)
    assert not callbacks.verify("k", header, body + b" ")
    assert not callbacks.verify("k", callbacks.sign("k", now - 3600, body), body)
    assert not callbacks.verify("k", "garbage", body)


@pytest.mark.parametrize(("entry", "why"), [
    ("https://hooks.example.com/x", "a host, not a URL"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("host:99999", "a port is a number from 1 to 65535"), ("*.example.com", "no wildcards"),
    ("fe80::1%eth0", "zone id"), ("[::1", "in brackets is written")])
def test_a_bad_allowed_host_says_what_is_wrong_with_it(entry, why):
    with pytest.raises(ValueError, match=re.escape(why)) as err:
        load_settings({"JOBS_CALLBACK_ALLOWED_HOSTS": f"ok.example.com,{entry}"})
    shown = describe_error(err.value)  # as `make run` and each function print it
    assert shown.startswith(f"JOBS_CALLBACK_ALLOWED_HOSTS entry {entry!r}: ") and why in shown
    assert "\n" not in shown and "pydantic" not in shown


@pytest.mark.parametrize("secret", ["short", "REPLACE_ME_CALLBACK_SECRET"])
def test_a_weak_or_template_callback_secret_is_refused_at_start(secret):
    with pytest.raises(ValueError, match="JOBS_CALLBACK_SECRET") as err:
        load_settings({"JOBS_CALLBACK_SECRET": secret})
    assert secret not in str(err.value)  # settings errors never echo values


def test_a_failed_try_never_names_the_address_the_host_resolved_to():
    import urllib3

    exc = urllib3.exceptions.MaxRetryError(
        None, "/", urllib3.exceptions.NewConnectionError(None, "10.1.2.3:443 refused"))
    assert callbacks._network_error(exc) == "could not connect"


@pytest.mark.parametrize("family, host", [(socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")])
def test_the_host_header_names_the_urls_host_an_ipv6_one_in_brackets(family, host):
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            seen.append(self.headers["Host"])
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    class Server(http.server.HTTPServer):
        address_family = family

    try:
        server = Server((host, 0), Handler)
    except OSError as exc:  # a machine without IPv6 loopback
        pytest.skip(f"cannot listen on {host}: {exc}")
    port = server.server_address[1]
    threading.Thread(target=server.handle_request, daemon=True).start()
    try:
        named = f"[{host}]" if ":" in host else host
        assert callbacks.post(f"http://{named}:{port}/hook?k=1", {}, b"{}", 5) == 204
    finally:
        server.server_close()
    assert seen == [f"{named}:{port}"]
