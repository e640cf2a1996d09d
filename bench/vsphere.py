"""vmfenced's vSphere API path against fence_vmware_soap on the same vcsim, in one run:
`python3 bench/vsphere.py [--quick] [-n N]`.

One vcsim (vmflab.vcsim, with the lab's WSDL patch so fence_vmware_soap can talk to it) per
setting: without delay, then with `-method-delay` on PowerOffVM_Task (a real vCenter's task
takes a moment). Alternately, on the same VMs (powered on again between runs, outside the
timed part):
- `fence_vmware_soap -o off` (Debian's fence-agents) as a new process: it logs in, parses the
  WSDL, finds the VM, powers it off and logs out, what it does under Pacemaker;
- vmfenced's `off` on its warm session (vmfenced.daemon.vsphere_fence.off: a fresh inventory
  read, PowerOffVM_Task, a fresh powerState read, a read after it, the verdict's rules).
Then the hybrid path (unless --no-hybrid): the lab's ESXi host esx1 (real sshd, a VM process)
mapped to vcsim's DC0_C0_H0, the daemon's Fencer over vCenter's hosts (vsphere_host.wire),
`off` of the same VM alternately with esx1 as a HybridHost (the guarded kill over its warm SSH
lane, vCenter the map) and as a plain ApiHost (PowerOffVM_Task), on the default vcsim and with
the PowerOffVM_Task delay.
- `fence_vmfenced -o off` as a new process, against a real vmfenced daemon with a vsphere
  entry for that vcsim (its own warm session).
Prints Markdown tables of medians, p95 and ratios. Not a test: no assertion on time.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import asyncssh
import pyVim.connect
import pyVmomi

from vmfenced.backends.registry import BACKENDS
from vmfenced.config import HostConfig, SSHConfig
from vmfenced.daemon import vsphere_fence
from vmfenced.daemon.fence import Fencer
from vmfenced.daemon.host import Host
from vmfenced.daemon.verdict import Step
from vmfenced.daemon.vsphere import VSphereSession
from vmfenced.daemon.vsphere_host import VSphereEntry, wire
from vmfenced.model import LinkState, VMMap
from vmflab import Lab
from vmflab.daemon import LabDaemon
from vmflab.stats import percentile
from vmflab.vcsim import PASSWORD, USERNAME, Vcsim, VcsimBuild, build

FENCE_SOAP = "/usr/sbin/fence_vmware_soap"
VMS = ("DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1", "DC0_H0_VM0", "DC0_H0_VM1")
SOAP = "fence_vmware_soap -o off (new process, login + WSDL each call)"
WARM = "vmfenced off on the warm session (daemon-side)"
AGENT = "fence_vmfenced off (new process, through the daemon's warm session)"
WAIT_S = 10.0
HYBRID_VM = "DC0_C0_RP0_VM0"
MAPPED = "DC0_C0_H0"
VIA_SSH = "Fencer off, hybrid: guarded kill over esx1's SSH lane, vCenter the map"
VIA_API = "Fencer off, API path: PowerOffVM_Task on the same host"

Rows = dict[str, list[float]]
vim: Any = pyVmomi.vim
SmartConnect: Any = pyVim.connect.SmartConnect
Disconnect: Any = pyVim.connect.Disconnect


def soap_off(port: int, vm: str) -> float:
    argv = [FENCE_SOAP, "-a", "127.0.0.1", "-u", str(port), "--ssl-insecure"]
    argv += ["-l", USERNAME, "-p", PASSWORD, "-n", vm, "-o", "off"]
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    elapsed = (time.perf_counter() - start) * 1000
    if result.returncode != 0:
        raise RuntimeError(f"fence_vmware_soap {vm}: {result.stdout} {result.stderr}")
    return elapsed


def vsphere_config(sim: Vcsim, workdir: Path) -> HostConfig:
    secret = workdir / "pw"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    return HostConfig(
        name="vc1",
        address="127.0.0.1",
        port=sim.port,
        kind="vsphere",
        username=USERNAME,
        password_file=secret,
        tls_verify=False,
    )


def agent_off(daemon: LabDaemon, vm: str) -> float:
    stdin = f"action=off\nplug={vm}\nsocket={daemon.socket}\n"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "vmfenced.clients.agent"],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    elapsed = (time.perf_counter() - start) * 1000
    if result.returncode != 0 or result.stdout != "Success: Powered OFF\n":
        raise RuntimeError(f"fence_vmfenced {vm}: {result.stdout} {result.stderr}")
    return elapsed


def vsphere_entry(sim: Vcsim, workdir: Path) -> str:
    config = vsphere_config(sim, workdir)
    return "\n".join(
        [
            "[[hosts]]",
            'name = "vc1"',
            'kind = "vsphere"',
            'address = "127.0.0.1"',
            f"port = {sim.port}",
            f'username = "{USERNAME}"',
            f'password_file = "{config.password_file}"',
            "tls_verify = false",
        ]
    )


async def setting(sim: Vcsim, workdir: Path, n: int, daemon: LabDaemon) -> Rows:
    session = VSphereSession(vsphere_config(sim, workdir), PASSWORD, call_timeout=30)
    task = asyncio.create_task(session.supervise())
    rows: Rows = {SOAP: [], WARM: [], AGENT: []}
    try:
        if not await session.wait_up(WAIT_S):
            raise RuntimeError(f"session not up: {session.reason}")
        for run in range(n):
            vm = VMS[run % len(VMS)]
            rows[SOAP].append(await asyncio.to_thread(soap_off, sim.port, vm))
            if (await vsphere_fence.on(session, vm)).step is not Step.POWER_ON:
                raise RuntimeError(f"{vm} did not power on again")
            start = time.perf_counter()
            decision = await vsphere_fence.off(session, vm)
            rows[WARM].append((time.perf_counter() - start) * 1000)
            if decision.step is not Step.KILLED:
                raise RuntimeError(f"{vm}: {decision.step} {decision.reason}")
            if (await vsphere_fence.on(session, vm)).step is not Step.POWER_ON:
                raise RuntimeError(f"{vm} did not power on again")
            rows[AGENT].append(await asyncio.to_thread(agent_off, daemon, vm))
            if (await vsphere_fence.on(session, vm)).step is not Step.POWER_ON:
                raise RuntimeError(f"{vm} did not power on again")
    finally:
        await session.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return rows


async def until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not condition():
        if loop.time() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)  # polling a condition with a deadline


async def hybrid(lab: Lab, sim: Vcsim, workdir: Path, n: int) -> Rows:
    """esx1 as a HybridHost, then as a plain ApiHost, alternately, on the same VM."""
    lab_host = lab.hosts["esx1"]
    esx1 = Host(
        HostConfig(name="esx1", address=lab_host.address, port=lab_host.port),
        SSHConfig(
            username=lab.username, client_keys=(lab.client_key,), known_hosts=lab.known_hosts
        ),
        BACKENDS["esxi"],
        [asyncssh.read_private_key(lab.client_key)],
        lambda _h, _l: None,
    )
    tasks: list[asyncio.Task[None]] = []
    esx1.start(lambda coro, name: tasks.append(asyncio.create_task(coro, name=name)))
    session = VSphereSession(vsphere_config(sim, workdir), PASSWORD, call_timeout=30)
    tasks.append(asyncio.create_task(session.supervise()))
    entry = VSphereEntry(session)
    hosts: dict[str, Any] = {}
    fencer = Fencer(cast(dict[str, Host], hosts), VMMap(), {}, 30, lambda _: None)
    rows: Rows = {VIA_SSH: [], VIA_API: []}
    try:
        await until(lambda: session.inventory is not None, "the vCenter map")
        await until(lambda: esx1.fence.state is LinkState.UP, "esx1's lane")
        await asyncio.to_thread(relocate, sim.port)
        for _ in range(n):
            for row, mapped in ((VIA_SSH, {MAPPED: esx1}), (VIA_API, {})):
                hosts.clear()
                hosts.update(wire(entry, mapped))
                await asyncio.to_thread(lab_host.start_vm, HYBRID_VM)
                await vsphere_fence.on(session, HYBRID_VM)
                start = time.perf_counter()
                result, _ = await fencer.fence(HYBRID_VM, "off")
                rows[row].append((time.perf_counter() - start) * 1000)
                if result.outcome != "killed":
                    raise RuntimeError(f"{row}: {result}")
                # The API row powered the vCenter VM off, not the lab process: stop it too.
                if HYBRID_VM in await asyncio.to_thread(lab_host.vm_pids):
                    await asyncio.to_thread(lab_host.stop_vm, HYBRID_VM)
    finally:
        await session.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await esx1.close()
    return rows


def relocate(port: int) -> None:
    """Puts the benchmark's VM on the mapped host (vcsim placed it anywhere in the cluster)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # vcsim's built-in test certificate
    si = SmartConnect(host="127.0.0.1", port=port, user=USERNAME, pwd=PASSWORD, sslContext=context)
    try:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(
            content.rootFolder, [vim.VirtualMachine, vim.HostSystem], True
        )
        objects = {o.name: o for o in view.view}
        view.Destroy()
        spec = vim.vm.RelocateSpec(host=objects[MAPPED])
        objects[HYBRID_VM].RelocateVM_Task(spec)
    finally:
        Disconnect(si)
        si._stub.DropConnections()


def table(title: str, rows: Rows, pair: tuple[str, str] = (SOAP, WARM)) -> str:
    lines = [
        f"\n### {title}\n",
        "| what | runs | median ms | p95 ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, values in rows.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {len(values)} | {median:.2f} | {percentile(values, 0.95):.2f} |")
    lines += ["", ratio_line(rows, *pair)]
    return "\n".join(lines)


def ratio_line(rows: Rows, slow: str, fast: str) -> str:
    ratio = statistics.median(rows[slow]) / statistics.median(rows[fast])
    return f"{slow} / {fast}: **{ratio:.1f}x**"


def hybrid_tables(
    lab: Lab, done: VcsimBuild, workdir: Path, settings: list[tuple[str, int | None]], n: int
) -> list[str]:
    out = []
    for title, delay in settings:
        method_delay = None if delay is None else {"PowerOffVM_Task": delay}
        with Vcsim(done, method_delay=method_delay) as sim:
            rows = asyncio.run(hybrid(lab, sim, workdir, n))
        out.append(table(f"hybrid against API path, {title}", rows, (VIA_API, VIA_SSH)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=10, help="runs per agent and setting (default 10)")
    parser.add_argument("--quick", action="store_true", help="2 of each: proves it still runs")
    parser.add_argument("--no-hybrid", action="store_true", help="skip the hybrid rows")
    parser.add_argument(
        "--delay-ms", type=int, default=1000, help="-method-delay of PowerOffVM_Task (1000)"
    )
    args = parser.parse_args()
    n = 2 if args.quick else args.n
    done = build()
    settings = [
        ("vcsim, no delay", None),
        (f"vcsim, PowerOffVM_Task +{args.delay_ms} ms", args.delay_ms),
    ]
    out = [f"vcsim {done.version}; n = {n} per row"]
    with (
        tempfile.TemporaryDirectory(prefix="bench-vsphere-") as tmp,
        Lab(Path(tmp) / "lab", host_names=("esx1",)) as lab,
    ):
        for title, delay in settings:
            method_delay = None if delay is None else {"PowerOffVM_Task": delay}
            # A fresh vcsim per setting: its memory grows with every task.
            with (
                Vcsim(done, wsdl=True, method_delay=method_delay) as sim,
                LabDaemon(lab, hosts=[], extra=vsphere_entry(sim, Path(tmp))) as daemon,
            ):
                rows = asyncio.run(setting(sim, Path(tmp), n, daemon))
            out.append(table(title, rows) + "\n" + ratio_line(rows, SOAP, AGENT))
        if not args.no_hybrid:
            out += hybrid_tables(lab, done, Path(tmp), settings, n)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
