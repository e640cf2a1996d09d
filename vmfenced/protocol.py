"""Socket messages (docs/protocol.md): requests validated by pydantic, replies as JSON lines."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from vmfenced.wire import MAX_HISTORY, MAX_VM_NAME

ERROR_CODES = frozenset(
    {
        "bad_request",
        "unknown_op",
        "too_large",
        "permission_denied",
        "unknown_vm",
        "fence_failed",
        "reload_failed",
        "unavailable",
        "internal",
    }
)

RequestId = Annotated[str, Field(max_length=128)] | int | None
VMName = Annotated[str, Field(min_length=1, max_length=MAX_VM_NAME, pattern=r"^[^\x00-\x1f\x7f]+$")]


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    id: RequestId = None


class StatusRequest(_Request):
    op: Literal["status"]


class ListRequest(_Request):
    op: Literal["list"]


class VMStatusRequest(_Request):
    op: Literal["vm_status"]
    vm: VMName


class FenceRequest(_Request):
    op: Literal["fence"]
    vm: VMName
    action: Literal["off", "on", "reboot"] = "off"


class ReloadRequest(_Request):
    op: Literal["reload"]


class HistoryRequest(_Request):
    op: Literal["history"]
    vm: VMName | None = None
    since: Annotated[float, Field(allow_inf_nan=False)] | None = None
    limit: Annotated[int, Field(ge=1, le=MAX_HISTORY)] = 100


class MetricsRequest(_Request):
    op: Literal["metrics"]


Request = Annotated[
    StatusRequest
    | ListRequest
    | VMStatusRequest
    | FenceRequest
    | ReloadRequest
    | HistoryRequest
    | MetricsRequest,
    Field(discriminator="op"),
]
_REQUEST: TypeAdapter[Request] = TypeAdapter(Request)
OPS = frozenset({"status", "list", "vm_status", "fence", "reload", "history", "metrics"})


class ProtocolError(Exception):
    """A request that cannot be served; becomes an error reply."""

    def __init__(
        self, code: str, message: str, request_id: Any = None, vm: str | None = None
    ) -> None:
        assert code in ERROR_CODES
        self.code = code
        self.message = message
        self.request_id = request_id
        self.vm = vm
        super().__init__(f"{code}: {message}")


def _safe_id(value: Any) -> str | int | None:
    # Echo the id only when it is one the protocol allows, so a hostile id is never reflected.
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and len(value) <= 128):
        return value
    return None


def decode(line: bytes) -> Request:
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ProtocolError("bad_request", f"not valid JSON: {reason}") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_request", f"a request must be a JSON object, not {_kind(data)}")
    request_id = _safe_id(data.get("id"))
    op = data.get("op")
    if not isinstance(op, str):
        raise ProtocolError("bad_request", "missing or non-string 'op'", request_id)
    if op not in OPS:
        shown = op if len(op) <= 64 else op[:64] + "..."
        raise ProtocolError(
            "unknown_op", f"unknown op {shown!r}; known: {', '.join(sorted(OPS))}", request_id
        )
    try:
        return _REQUEST.validate_python(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(p) for p in err["loc"][1:]) or "request"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {msg}")
        raise ProtocolError("bad_request", "; ".join(problems), request_id) from None


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number"
    )


def reply_ok(request_id: Any, result: dict[str, Any]) -> bytes:
    return _line({"id": request_id, "ok": True, "result": result})


def reply_error(request_id: Any, code: str, message: str, vm: str | None = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if vm is not None:
        error["vm"] = vm
    return _line({"id": request_id, "ok": False, "error": error})


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
