"""structlog on stdout: JSON lines under systemd (journald) or into a file, readable lines on a
terminal. Under journald each line starts with its syslog priority (`<3>`), so `journalctl -p`
filters by level. Secrets never reach a log line: keys that name one are masked.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

# journald reads a leading "<N>" as the line's syslog priority (SyslogLevelPrefix=yes).
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
SECRET_WORDS = ("password", "passphrase", "secret", "private", "token", "credential")
MASK = "[redacted]"


def under_journald(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """systemd sets JOURNAL_STREAM=dev:inode of the stream it connected to the journal."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, inode = value.partition(":")
    if not (dev.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(inode))


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if any(word in key.lower() for word in SECRET_WORDS) or (
            isinstance(value, str) and "PRIVATE KEY-----" in value
        ):
            event[key] = MASK
    return event


class _JournaldJSON:
    """JSON with the syslog priority in front, for journald."""

    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer()

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        line = self._json(logger, method, event)
        text = line.decode() if isinstance(line, bytes) else line
        return f"<{PRIORITIES.get(method, 6)}>{text}"


class _ToStructlog(logging.Handler):
    """asyncssh and other libraries log through `logging`: their warnings join our stream."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        structlog.get_logger(record.name).log(record.levelno, message, logger=record.name)


def configure(level: str = "info", json: bool | None = None, stream: TextIO | None = None) -> None:
    out = sys.stdout if stream is None else stream
    journald = under_journald(out)
    if json is None:
        json = journald or not out.isatty()
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    if json:
        processors.append(_JournaldJSON() if journald else structlog.processors.JSONRenderer())
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    root.handlers[:] = [_ToStructlog()]
    root.setLevel(logging.WARNING)
