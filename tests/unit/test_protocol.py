"""Socket protocol: every malformed request becomes a precise error, never an exception."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmfenced.protocol import (
    FenceRequest,
    ProtocolError,
    StatusRequest,
    decode,
    reply_error,
    reply_ok,
)


def error_of(line: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(line)
    return info.value


def test_valid_requests() -> None:
    assert decode(b'{"op":"status"}') == StatusRequest(op="status")
    request = decode(b'{"op":"fence","vm":"node1","id":7}')
    assert request == FenceRequest(op="fence", vm="node1", action="off", id=7)


@pytest.mark.parametrize(
    ("line", "code", "fragment"),
    [
        (b"{", "bad_request", "not valid JSON"),
        (b"\xff\xfe", "bad_request", "not valid JSON"),
        (b"[1,2]", "bad_request", "must be a JSON object, not an array"),
        (b'"status"', "bad_request", "not a string"),
        (b"{}", "bad_request", "missing or non-string 'op'"),
        (b'{"op":"explode"}', "unknown_op", "unknown op 'explode'"),
        (b'{"op":"fence"}', "bad_request", "vm: Field required"),
        (b'{"op":"fence","vm":"a","action":"nuke"}', "bad_request", "action: Input should be"),
        (b'{"op":"fence","vm":""}', "bad_request", "vm: String should have at least 1 character"),
        (b'{"op":"fence","vm":"a\\nb"}', "bad_request", "vm: String should match pattern"),
        (b'{"op":"fence","vm":5}', "bad_request", "vm: Input should be a valid string"),
        (b'{"op":"status","extra":1}', "bad_request", "extra: unknown key"),
        (b"[" * 100000 + b"]" * 100000, "bad_request", "not valid JSON"),
    ],
)
def test_malformed_requests(line: bytes, code: str, fragment: str) -> None:
    error = error_of(line)
    assert error.code == code
    assert fragment in error.message


def test_error_keeps_a_valid_id_only() -> None:
    assert error_of(b'{"op":"x","id":"abc"}').request_id == "abc"
    assert error_of(b'{"op":"x","id":{"a":1}}').request_id is None
    assert error_of(b'{"op":"x","id":"' + b"a" * 500 + b'"}').request_id is None


def test_replies_are_one_json_line() -> None:
    line = reply_ok(3, {"vm": "ñ"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"id": 3, "ok": True, "result": {"vm": "ñ"}}
    error = json.loads(reply_error(None, "unknown_vm", "no", vm="x"))
    assert error == {
        "id": None,
        "ok": False,
        "error": {"code": "unknown_vm", "message": "no", "vm": "x"},
    }


@given(st.binary(max_size=512))
def test_random_bytes_never_escape_as_other_exceptions(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(data)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_random_json_never_escapes(value: object) -> None:
    with contextlib.suppress(ProtocolError):
        decode(json.dumps(value).encode())
