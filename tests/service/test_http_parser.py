"""Which HTTP parser ``aat serve`` runs (``AAT_HTTP_PARSER``) and the httptools subclass's own
pieces: ``auto`` picks httptools when importable and h11 when not, a forced one is honoured, a
bad value or a forced parser that is missing is refused with a message naming the variable; the
head limit is h11's; httptools' errors become the 400 body's reason.

The guards' answers over a real server, for both parsers, are in test_slow_clients.py.
"""

from __future__ import annotations

import subprocess
import sys

import httptools
import pytest
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from aat_serve.adapters.errors import ConfigError
from aat_serve.service.http_protocol import (
    GENERIC_PARSE_ERROR,
    MAX_HEAD_BYTES,
    GuardedConnection,
    http_protocol,
    httptools_reason,
    resolve_parser,
)
from aat_serve.service.settings import load_settings
from tests.server_process import aat_command

BASES = {"h11": H11Protocol, "httptools": HttpToolsProtocol}


@pytest.fixture
def no_httptools(monkeypatch):
    """``import httptools`` raises ImportError, as where it is not installed."""
    monkeypatch.setitem(sys.modules, "httptools", None)


def test_auto_picks_httptools_when_importable():
    assert resolve_parser("auto") == resolve_parser() == "httptools"
    cls = http_protocol(3.0, "auto")
    assert issubclass(cls, HttpToolsProtocol) and issubclass(cls, GuardedConnection)
    assert not issubclass(cls, H11Protocol)


def test_auto_falls_back_to_h11_without_httptools(no_httptools):
    with pytest.raises(ImportError):
        import httptools  # noqa: F401
    assert resolve_parser("auto") == "h11"
    cls = http_protocol(3.0, "auto")
    assert issubclass(cls, H11Protocol) and issubclass(cls, GuardedConnection)
    assert not issubclass(cls, HttpToolsProtocol)


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_a_forced_parser_is_honoured(parser):
    cls = http_protocol(2.5, parser)
    assert resolve_parser(parser) == parser
    assert issubclass(cls, BASES[parser]) and issubclass(cls, GuardedConnection)
    other = BASES["h11" if parser == "httptools" else "httptools"]
    assert not issubclass(cls, other)
    assert cls.header_timeout_s == 2.5


def test_forced_h11_stays_h11_and_forced_httptools_missing_is_refused(no_httptools):
    assert issubclass(http_protocol(1.0, "h11"), H11Protocol)
    with pytest.raises(ConfigError) as e:
        resolve_parser("httptools")
    assert str(e.value) == ("AAT_HTTP_PARSER=httptools but httptools is not installed (pip "
                            "install httptools); use auto or h11")


def test_an_unknown_parser_is_refused_naming_the_choices():
    with pytest.raises(ConfigError) as e:
        http_protocol(1.0, "llhttp")
    assert str(e.value) == ("AAT_HTTP_PARSER: unknown HTTP parser 'llhttp'; expected one of "
                            "auto, httptools, h11")


def test_the_setting_is_read_case_insensitively(monkeypatch):
    for value, expected in (("H11", "h11"), ("HttpTools", "httptools"), (None, "auto")):
        if value is None:
            monkeypatch.delenv("AAT_HTTP_PARSER", raising=False)
        else:
            monkeypatch.setenv("AAT_HTTP_PARSER", value)
        assert load_settings().http_parser == expected


def test_aat_serve_refuses_a_bad_parser_before_loading_anything(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "AAT_HTTP_PARSER": "fast"}
    r = subprocess.run([*aat_command(), "serve", "--port", "1"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "error: invalid configuration: AAT_HTTP_PARSER: Input should be 'auto', 'httptools' or "
        "'h11' (got 'fast')")


def test_the_head_limit_is_h11s():
    import h11
    from uvicorn.config import Config

    assert MAX_HEAD_BYTES == h11._connection.DEFAULT_MAX_INCOMPLETE_EVENT_SIZE == 16384
    # uvicorn leaves h11 at its default unless told otherwise, which aat serve does not
    assert Config(app=None).h11_max_incomplete_event_size is None


def _callback_error(raised: BaseException) -> BaseException:
    """What httptools raises from ``feed_data`` when a callback raised ``raised``."""

    class Callbacks:
        def on_headers_complete(self) -> None:
            raise raised

    parser = httptools.HttpRequestParser(Callbacks())
    with pytest.raises(httptools.HttpParserError) as e:
        parser.feed_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    return e.value


def test_httptools_reasons_name_what_was_wrong():
    parser = httptools.HttpRequestParser(object())
    with pytest.raises(httptools.HttpParserError) as e:
        parser.feed_data(b"POST / HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n")
    assert httptools_reason(e.value) == "Invalid character in Content-Length"
    # an error raised in a callback: the parser error inside it is the reason ...
    inner = httptools.HttpParserInvalidURLError("invalid url b'/x'")
    outer = _callback_error(inner)
    assert isinstance(outer, httptools.HttpParserCallbackError)
    assert httptools_reason(outer) == "invalid url b'/x'"
    # ... anything else (a bug of ours, say) is not echoed to the client
    outer = _callback_error(KeyError("internal detail"))
    assert httptools_reason(outer) == GENERIC_PARSE_ERROR
