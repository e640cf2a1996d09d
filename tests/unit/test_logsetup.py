"""Logging: JSON lines (with journald's priority prefix under systemd), secrets masked, library
warnings in the same stream."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from vmfenced.daemon import logsetup


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


def test_json_lines_with_host_and_vm_fields_and_no_secrets() -> None:
    out = io.StringIO()
    logsetup.configure("info", json=True, stream=out)
    log = structlog.get_logger("t")
    log.info("fence done", host="esx1", vm="gfs-node1", passphrase="hunter2")
    log.info("key", material="-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl...")
    log.debug("not shown")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert (first["event"], first["host"], first["vm"]) == ("fence done", "esx1", "gfs-node1")
    assert first["passphrase"] == "[redacted]"
    assert first["level"] == "info" and first["timestamp"].endswith("Z")
    assert second["material"] == "[redacted]"
    assert "hunter2" not in out.getvalue()


def test_library_warnings_join_the_stream() -> None:
    out = io.StringIO()
    logsetup.configure("info", json=True, stream=out)
    logging.getLogger("asyncssh").warning("connection lost to %s", "esx2")
    logging.getLogger("asyncssh").info("chatty")
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert (record["event"], record["logger"], record["level"]) == (
        "connection lost to esx2",
        "asyncssh",
        "warning",
    )


def test_journald_gets_the_syslog_priority(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "journal-stream"
    with path.open("w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logsetup.under_journald(stream)
        logsetup.configure("info", stream=stream)  # auto: JSON, because journald reads it
        log = structlog.get_logger("t")
        log.error("fence failed", vm="gfs-node2")
        log.info("ready")
    lines = path.read_text().splitlines()
    assert lines[0].startswith("<3>{") and json.loads(lines[0][3:])["vm"] == "gfs-node2"
    assert lines[1].startswith("<6>{")


def test_not_journald() -> None:
    assert not logsetup.under_journald(io.StringIO(), {"JOURNAL_STREAM": "1:2"})
    with Path(os.devnull).open("w") as stream:
        assert not logsetup.under_journald(stream, {"JOURNAL_STREAM": "junk"})
        assert not logsetup.under_journald(stream, {})
