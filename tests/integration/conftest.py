"""Fixtures of the integration tests: a real-sshd lab of ESXi hosts (vmflab)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmflab import Lab


def lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root"
    missing = [
        tool for tool in ("unshare", "sshd", "ssh", "ssh-keygen", "gcc") if not shutil.which(tool)
    ]
    if missing and not (missing == ["sshd"] and Path("/usr/sbin/sshd").exists()):
        return f"the lab needs {', '.join(missing)}"
    return None


def libvirt_unavailable() -> str | None:
    tools = ("virsh", "libvirtd", "virtlogd", "qemu-system-x86_64")
    missing = [t for t in tools if not (shutil.which(t) or Path(f"/usr/sbin/{t}").exists())]
    return f"the libvirt lab needs {', '.join(missing)}" if missing else None


def skip_without(reason: str | None) -> None:
    """Skip when the lab cannot run here; in CI a missing prerequisite is a broken setup, not
    a reason to run nothing."""
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def skip_without_lab() -> None:
    skip_without(lab_unavailable())


@pytest.fixture
def kvm_lab(tmp_path: Path) -> Iterator[Lab]:
    """A started lab of two libvirt hosts with real qemu VMs (kvm1, kvm2) and one ESXi host
    (esx1); every process of it is killed afterwards, whether the test passed or not."""
    skip_without(lab_unavailable() or libvirt_unavailable())
    with Lab(tmp_path / "lab", host_names=("esx1",), libvirt_hosts=("kvm1", "kvm2")) as started:
        yield started


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A started 3-host lab (esx1, esx2, esx3); every process of it is killed afterwards,
    whether the test passed or not."""
    skip_without_lab()
    with Lab(tmp_path / "lab") as started:
        yield started


@pytest.fixture
def esx_lab(tmp_path: Path) -> Iterator[Lab]:
    """Two ESXi lab hosts (esx1, esx2); every process is killed afterwards."""
    skip_without_lab()
    with Lab(tmp_path / "lab", host_names=("esx1", "esx2")) as started:
        yield started


@pytest.fixture
def classic_lab(tmp_path: Path) -> Iterator[Lab]:
    """One esx-classic lab host (esx3a); every process is killed afterwards."""
    skip_without_lab()
    with Lab(tmp_path / "lab", host_names=(), classic_hosts=("esx3a",)) as started:
        yield started
