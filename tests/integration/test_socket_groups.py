"""Who may use the socket, on the real-sshd lab: supplementary groups come from SO_PEERGROUPS
(the kernel's record at connect()), never from /proc/PID, which may belong to another process by
the time the daemon looks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.socket_clients import (
    GROUP,
    LONG_IDLE,
    NOBODY,
    ask,
    ask_then_change_groups,
    gid_of,
    lab_of_two,
    open_socket_to_others,
)
from vmflab import Lab
from vmflab.daemon import LabDaemon

pytestmark = pytest.mark.integration


@pytest.fixture
def daemon(lab: Lab) -> Iterator[LabDaemon]:
    """A daemon on esx1 whose socket serves root and GROUP, reachable by other uids."""
    daemon_keys = {**LONG_IDLE, "socket_mode": "0666", "socket_group": GROUP}
    with LabDaemon(lab, hosts=["esx1"], daemon=daemon_keys) as running:
        open_socket_to_others(running)
        yield running


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from lab_of_two(tmp_path_factory)


def test_supplementary_groups_come_from_so_peergroups(daemon: LabDaemon) -> None:
    users = gid_of(GROUP)
    denied = ask(daemon, NOBODY, [])
    assert denied["error"] == {
        "code": "permission_denied",
        "message": f"uid {NOBODY} is not root nor in group {GROUP}",
    }
    assert ask(daemon, NOBODY, [users])["ok"]
    # More groups than CPython's getsockopt buffer holds (256): read through libc.
    many = list(range(30000, 30300))
    assert ask(daemon, NOBODY, [*many, users])["ok"]
    assert ask(daemon, NOBODY, many)["error"]["code"] == "permission_denied"


def test_groups_are_the_ones_recorded_at_connect(daemon: LabDaemon) -> None:
    """Not what the process (or a process that reused its PID) has when the daemon looks."""
    users = gid_of(GROUP)
    gained = ask_then_change_groups(daemon, [], [users])
    assert gained["error"]["code"] == "permission_denied", gained
    lost = ask_then_change_groups(daemon, [users], [])
    assert lost["ok"] is True, lost
