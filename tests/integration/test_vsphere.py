"""kind = "vsphere" against vcsim: the warm session, its live map and off/status/on through
the verdict rules (docs/vsphere.md)."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from tests.integration.vcsim_fixtures import Actor, actor, password_file, vcsim, vcsim_build
from vmfenced.config import HostConfig
from vmfenced.daemon import vsphere, vsphere_fence
from vmfenced.daemon.verdict import Step
from vmfenced.daemon.vsphere import VSphereSession, read_password
from vmfenced.model import LinkState
from vmflab.vcsim import USERNAME, Vcsim, VcsimBuild

pytestmark = pytest.mark.integration
__all__ = ["actor", "vcsim", "vcsim_build"]

WAIT_S = 10


def host_config(port: int, directory: Path, **extra: object) -> HostConfig:
    settings: dict[str, object] = {"tls_verify": False, **extra}
    return HostConfig.model_validate(
        {
            "name": "vc1",
            "address": "127.0.0.1",
            "port": port,
            "kind": "vsphere",
            "username": USERNAME,
            "password_file": str(password_file(directory)),
            **settings,
        }
    )


async def until(condition: Callable[[], object], timeout: float = WAIT_S) -> None:
    """Polls a condition with a deadline (never a blind sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def started(config: HostConfig) -> tuple[VSphereSession, asyncio.Task[None]]:
    session = VSphereSession(config, "pass", call_timeout=5)
    task = asyncio.create_task(session.supervise())
    assert await session.wait_up(WAIT_S), session.reason
    await until(lambda: session.inventory is not None)
    return session, task


async def stopped(session: VSphereSession, task: asyncio.Task[None]) -> None:
    await session.close()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest_asyncio.fixture
async def session(vcsim: Vcsim, tmp_path: Path) -> AsyncIterator[VSphereSession]:
    one, task = await started(host_config(vcsim.port, tmp_path))
    try:
        yield one
    finally:
        await stopped(one, task)


def power_state(session: VSphereSession, name: str) -> str | None:
    assert session.inventory is not None
    found = session.inventory.named(name)
    return found[0].power_state if len(found) == 1 else None


def host_of(session: VSphereSession, name: str) -> str | None:
    inventory = session.inventory
    assert inventory is not None
    found = inventory.named(name)
    if len(found) != 1 or found[0].host is None:
        return None
    return inventory.hosts[found[0].host].name


@pytest.mark.asyncio
async def test_off_status_on_cycle(session: VSphereSession, actor: Actor) -> None:
    vm = "DC0_C0_RP0_VM0"
    assert (await vsphere_fence.status(session, vm)).step is Step.ON
    killed = await vsphere_fence.off(session, vm)
    assert killed.step is Step.KILLED, killed.reason
    assert killed.target is not None and killed.target.host.startswith("vc1/DC0_C0_H")
    assert actor.vm(vm).runtime.powerState == "poweredOff"
    assert (await vsphere_fence.status(session, vm)).step is Step.OFF
    assert (await vsphere_fence.off(session, vm)).step is Step.ALREADY_OFF
    assert (await vsphere_fence.on(session, vm)).step is Step.POWER_ON
    assert actor.vm(vm).runtime.powerState == "poweredOn"
    assert (await vsphere_fence.on(session, vm)).step is Step.ON


@pytest.mark.asyncio
async def test_a_vm_vcenter_does_not_know_fails(session: VSphereSession) -> None:
    for action in (vsphere_fence.off, vsphere_fence.status, vsphere_fence.on):
        decision = await action(session, "no-such-vm")
        assert (decision.step, decision.unknown) == (Step.FAIL, True)


@pytest.mark.asyncio
async def test_twins_fail_and_nothing_is_powered_off(session: VSphereSession, actor: Actor) -> None:
    vm = "DC0_C0_RP0_VM1"
    actor.twin(vm)
    decision = await vsphere_fence.off(session, vm)
    assert decision.step is Step.FAIL
    assert "ambiguous: 2 instances" in decision.reason
    states = {
        v.runtime.powerState
        for v in actor._all(__import__("pyVmomi").vim.VirtualMachine)
        if v.name == vm
    }
    assert states == {"poweredOn"}


@pytest.mark.asyncio
async def test_map_follows_out_of_band_power_off(session: VSphereSession, actor: Actor) -> None:
    vm = "DC0_C0_RP0_VM2"
    await until(lambda: power_state(session, vm) == "poweredOn")
    actor.power(vm, on=False)
    await until(lambda: power_state(session, vm) == "poweredOff")
    assert (await vsphere_fence.status(session, vm)).step is Step.OFF
    actor.power(vm, on=True)
    await until(lambda: power_state(session, vm) == "poweredOn")


@pytest.mark.asyncio
async def test_map_follows_a_relocation(session: VSphereSession, actor: Actor) -> None:
    vm = "DC0_C0_RP0_VM3"
    await until(lambda: host_of(session, vm) is not None)
    before = host_of(session, vm)
    other = next(h for h in ("DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2") if h != before)
    actor.relocate(vm, other)
    await until(lambda: host_of(session, vm) == other)
    decision = await vsphere_fence.off(session, vm)
    assert decision.step is Step.KILLED and decision.target is not None
    assert decision.target.host == f"vc1/{other}"
    actor.power(vm, on=True)


@pytest.mark.asyncio
async def test_terminated_session_logs_in_again(session: VSphereSession, actor: Actor) -> None:
    assert session.logins == 1
    assert actor.terminate_sessions() >= 1
    first = await vsphere_fence.status(session, "DC0_H0_VM2")
    # The call that found the session gone fails; nothing is guessed.
    assert first.step is Step.FAIL and "session lost" in first.reason
    await until(lambda: session.logins == 2 and session.state is LinkState.UP)
    assert (await vsphere_fence.status(session, "DC0_H0_VM2")).step is Step.ON


@pytest.mark.asyncio
async def test_vcenter_restart_logs_in_again(vcsim_build: VcsimBuild, tmp_path: Path) -> None:
    with Vcsim(vcsim_build) as sim:
        one, task = await started(host_config(sim.port, tmp_path))
        try:
            sim.restart()
            await until(lambda: one.state is LinkState.DOWN)
            await until(lambda: one.state is LinkState.UP and one.logins >= 2)
            decision = await vsphere_fence.off(one, "DC0_H0_VM0")
            assert decision.step is Step.KILLED, decision.reason
        finally:
            await stopped(one, task)


@pytest.mark.asyncio
async def test_vcenter_down_fails_the_fence(vcsim_build: VcsimBuild, tmp_path: Path) -> None:
    with Vcsim(vcsim_build) as sim:
        one, task = await started(host_config(sim.port, tmp_path))
        try:
            sim.stop()
            await until(lambda: one.state is LinkState.DOWN)
            decision = await vsphere_fence.off(one, "DC0_H0_VM0")
            assert decision.step is Step.FAIL and "not logged in" in decision.reason
        finally:
            await stopped(one, task)


def _thumbprint(port: int) -> str:
    pem = ssl.get_server_certificate(("127.0.0.1", port))
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, 64, 2))


@pytest.mark.asyncio
async def test_pinned_thumbprint(vcsim: Vcsim, tmp_path: Path) -> None:
    right = host_config(
        vcsim.port, tmp_path, tls_verify=True, tls_thumbprint=_thumbprint(vcsim.port)
    )
    one, task = await started(right)
    await stopped(one, task)
    wrong = host_config(vcsim.port, tmp_path, tls_verify=True, tls_thumbprint="ab" * 32)
    two = VSphereSession(wrong, "pass", call_timeout=5)
    task = asyncio.create_task(two.supervise())
    try:
        await until(lambda: two.state is LinkState.DOWN)
        assert two.reason is not None and "login failed" in two.reason
        assert two.logins == 0
    finally:
        await stopped(two, task)


@pytest.mark.asyncio
async def test_system_ca_refuses_the_lab_certificate(vcsim: Vcsim, tmp_path: Path) -> None:
    two = VSphereSession(host_config(vcsim.port, tmp_path, tls_verify=True), "pass")
    task = asyncio.create_task(two.supervise())
    try:
        await until(lambda: two.state is LinkState.DOWN)
        assert two.reason is not None and "CERTIFICATE_VERIFY_FAILED" in two.reason
    finally:
        await stopped(two, task)


@pytest.mark.asyncio
async def test_wrong_password_is_down_with_reason(vcsim: Vcsim, tmp_path: Path) -> None:
    two = VSphereSession(host_config(vcsim.port, tmp_path), "not-the-password")
    task = asyncio.create_task(two.supervise())
    try:
        await until(lambda: two.state is LinkState.DOWN)
        assert two.reason is not None and "InvalidLogin" in two.reason
        assert "not-the-password" not in two.reason
    finally:
        await stopped(two, task)


@pytest.mark.asyncio
async def test_a_rotated_password_file_is_read_at_the_next_login(
    vcsim: Vcsim, actor: Actor, tmp_path: Path
) -> None:
    config = host_config(vcsim.port, tmp_path)
    assert config.password_file is not None
    path = config.password_file
    one = VSphereSession(config, lambda: read_password(path), call_timeout=5)
    task = asyncio.create_task(one.supervise())
    try:
        assert await one.wait_up(WAIT_S), one.reason
        # vcsim accepts only its own password: a file now holding another one must fail the
        # next login, which proves the file is read again rather than remembered.
        path.write_text("rotated-elsewhere\n")
        assert actor.terminate_sessions() >= 1
        await until(lambda: one.reason is not None and "InvalidLogin" in one.reason)
        assert "rotated-elsewhere" not in (one.reason or "")
        password_file(tmp_path)  # the right one back: logged in again without a restart
        await until(lambda: one.state is LinkState.UP and one.logins >= 2)
    finally:
        await stopped(one, task)


@pytest.mark.asyncio
async def test_slow_power_off_does_not_stall_the_map(
    vcsim_build: VcsimBuild, tmp_path: Path
) -> None:
    """The map's own collector keeps delivering while a fence waits on a slow task."""
    with Vcsim(vcsim_build, method_delay={"PowerOffVM_Task": 1500}) as sim, Actor(sim) as act:
        one, task = await started(host_config(sim.port, tmp_path))
        try:
            fence = asyncio.create_task(vsphere_fence.off(one, "DC0_H0_VM0"))
            act.relocate(
                "DC0_C0_RP0_VM0",
                "DC0_C0_H2"
                if act.vm("DC0_C0_RP0_VM0").runtime.host.name != "DC0_C0_H2"
                else "DC0_C0_H0",
            )
            loop = asyncio.get_running_loop()
            fence_done: list[float] = []
            fence.add_done_callback(lambda _task: fence_done.append(loop.time()))
            target = act.vm("DC0_C0_RP0_VM0").runtime.host.name
            await until(lambda: host_of(one, "DC0_C0_RP0_VM0") == target)
            map_saw_it = loop.time()
            assert (await fence).step is Step.KILLED
            # The map showed the move before the slow power-off's fence ended.
            assert map_saw_it < fence_done[0]
        finally:
            await stopped(one, task)


@pytest.mark.asyncio
async def test_a_call_timeout_shorter_than_the_watch_wait_keeps_the_session(
    vcsim: Vcsim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fence_timeout is every call's socket timeout; a quiet WaitForUpdatesEx lasts
    WATCH_WAIT_S. The watcher's own stub waits longer: quiet rounds end normally instead of
    timing out and logging in again and again."""
    monkeypatch.setattr(vsphere, "WATCH_WAIT_S", 2)
    one = VSphereSession(host_config(vcsim.port, tmp_path), "pass", call_timeout=1)
    task = asyncio.create_task(one.supervise())
    try:
        assert await one.wait_up(WAIT_S), one.reason
        # The first round answers at once (the whole inventory); the next two are quiet.
        await until(lambda: one.watch_rounds >= 3)
        assert (one.logins, one.state) == (1, LinkState.UP), one.reason
    finally:
        await stopped(one, task)
