"""The lab's context managers (lab, daemon, cluster): started on entry, closed on exit."""

from __future__ import annotations

from typing import Self


class Started:
    """``with X(...) as x``: ``start()`` on entry; ``close()`` on exit, even after a failure
    (``closing(ok=False)``: a subclass may tear down less gracefully then)."""

    def start(self) -> object:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def closing(self, *, ok: bool) -> None:
        del ok
        self.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.closing(ok=exc_info[0] is None)
