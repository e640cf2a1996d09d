"""Fixtures of the vSphere tests: one vcsim per test module, and an out-of-band actor.

Import the fixtures a module uses (`from tests.integration.vcsim_fixtures import vcsim`);
each vcsim is stopped by PID when its module ends, whether its tests passed or not.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pyVim.connect
import pyVmomi

from tests.integration.conftest import skip_without
from vmflab.vcsim import PASSWORD, USERNAME, Vcsim, VcsimBuild, build, vcsim_unavailable

vim: Any = pyVmomi.vim
connect: Any = pyVim.connect


@pytest.fixture(scope="module")
def vcsim_build() -> VcsimBuild:
    skip_without(vcsim_unavailable())
    return build()


@pytest.fixture(scope="module")
def vcsim(vcsim_build: VcsimBuild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    """vCenter mode: DC0, cluster hosts DC0_C0_H0..H2 and standalone DC0_H0, 4 VMs per pool."""
    log = tmp_path_factory.mktemp("vcsim") / "vcsim.log"
    with Vcsim(vcsim_build, vms=4, log_path=log) as started:
        yield started


class Actor:
    """Another client of the simulator (an administrator, DRS): changes behind the daemon."""

    def __init__(self, sim: Vcsim) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # vcsim's built-in test certificate
        self.si: Any = connect.SmartConnect(
            host="127.0.0.1", port=sim.port, user=USERNAME, pwd=PASSWORD, sslContext=context
        )
        self.content: Any = self.si.RetrieveContent()

    def _all(self, kind: Any) -> list[Any]:
        view = self.content.viewManager.CreateContainerView(self.content.rootFolder, [kind], True)
        try:
            return list(view.view)
        finally:
            view.Destroy()

    def hosts(self) -> list[Any]:
        return self._all(vim.HostSystem)

    def vm(self, name: str) -> Any:
        found = [v for v in self._all(vim.VirtualMachine) if v.name == name]
        assert len(found) == 1, f"{name}: {len(found)} VMs"
        return found[0]

    def host(self, name: str) -> Any:
        found = [h for h in self._all(vim.HostSystem) if h.name == name]
        assert len(found) == 1, f"{name}: {len(found)} hosts"
        return found[0]

    def power(self, name: str, on: bool) -> None:
        vm = self.vm(name)
        task = vm.PowerOnVM_Task() if on else vm.PowerOffVM_Task()
        assert task.info.state == "success"  # vcsim ends tasks inside the call

    def relocate(self, name: str, host: str) -> None:
        spec = vim.vm.RelocateSpec(host=self.host(host))
        task = self.vm(name).RelocateVM_Task(spec)
        assert task.info.state == "success", task.info.error

    def twin(self, name: str, *, on: bool = True) -> None:
        """A second VM of the same name (another folder: vCenter refuses twins in one)."""
        vm = self.vm(name)
        folder = vm.parent.CreateFolder(f"twins-{name}")
        spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(), powerOn=False)
        task = vm.CloneVM_Task(folder, name, spec)
        assert task.info.state == "success", task.info.error
        if on:
            # vcsim ignores CloneSpec.powerOn: the clone is powered on by a call of its own.
            assert task.info.result.PowerOnVM_Task().info.state == "success"

    def terminate_sessions(self) -> int:
        """Ends every session but this one (an administrator's "terminate session")."""
        manager = self.content.sessionManager
        mine = manager.currentSession.key
        others = [s.key for s in manager.sessionList if s.key != mine]
        if others:
            manager.TerminateSession(others)
        return len(others)

    def close(self) -> None:
        try:
            connect.Disconnect(self.si)
        finally:
            # Disconnect logs out but leaves the pooled sockets open.
            self.si._stub.DropConnections()

    def __enter__(self) -> Actor:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@pytest.fixture
def actor(vcsim: Vcsim) -> Iterator[Actor]:
    with Actor(vcsim) as acting:
        yield acting


def password_file(directory: Path) -> Path:
    path = directory / "vc.password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path
