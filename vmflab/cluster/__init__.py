"""The lab's Pacemaker cluster: corosync + Pacemaker nodes as namespace "machines" tied to VMs.

``harness`` holds ``Cluster`` (see its docstring); ``machine`` one boot of a node, ``node`` the
tie between a node and its VM's process, ``vm`` the VMs a node may run on, ``config`` and
``view`` the cluster's files and what ``crm_mon`` says. The names are imported on first use, so
that importing one module of the package (a node's PID 1 does) does not load the harness.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmflab.cluster.harness import Cluster

__all__ = ["Cluster"]


def __getattr__(name: str) -> object:
    if name == "Cluster":
        return importlib.import_module("vmflab.cluster.harness").Cluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
