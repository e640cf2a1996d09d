"""known_hosts files parsed once and shared by every lane (out of link.py, which is long)."""

from __future__ import annotations

from pathlib import Path

import asyncssh


class KnownHosts:
    """known_hosts files parsed once and shared by every lane, parsed again when they change.

    asyncssh parses a path on every connection: with 200 hosts that is a quarter of the
    daemon's start-up CPU (every lane parses every entry). Keyed by (mtime, size, inode), an
    edited file is read again at the next connection, as when asyncssh read it each time.
    """

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[tuple[int, int, int], asyncssh.SSHKnownHosts]] = {}

    def get(self, path: Path) -> asyncssh.SSHKnownHosts | str:
        try:
            st = path.stat()
        except OSError:
            return str(path)  # asyncssh reports the missing file as it always did
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._cache.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, asyncssh.read_known_hosts(str(path)))
            self._cache[path] = cached
        return cached[1]
