"""The lab PID 1's account of its children, which the lab reuses PIDs for on purpose."""

from __future__ import annotations

import argparse
import io

from vmflab.pid1.core import Init


def test_a_reused_pid_belongs_to_its_new_child() -> None:
    init = Init(argparse.Namespace(), io.StringIO())
    init.started("corosync", 10)
    init.started("pacemakerd", 11)
    init.exits.update({10: 0, 11: 1})  # both reaped, as reap() records them
    assert init.running("corosync") is None and init.exit_code("pacemakerd") == 1
    init.started("corosync", 12)
    init.started("pacemakerd", 10)  # the PID corosync had
    assert init.running("pacemakerd") == 10
    assert init.exit_code("pacemakerd") is None
    assert init.running("corosync") == 12
    assert init.running("sshd") is None and init.exit_code("sshd") is None
