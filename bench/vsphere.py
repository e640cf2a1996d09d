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
Not yet here: fence_vmfenced through the daemon (the daemon does not serve kind = "vsphere"
yet) and the hybrid path (docs/vsphere.md). Prints Markdown tables of medians, p95 and ratios.
Not a test: no assertion on time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmfenced.config import HostConfig
from vmfenced.daemon import vsphere_fence
from vmfenced.daemon.verdict import Step
from vmfenced.daemon.vsphere import VSphereSession
from vmflab.stats import percentile
from vmflab.vcsim import PASSWORD, USERNAME, Vcsim, build

FENCE_SOAP = "/usr/sbin/fence_vmware_soap"
VMS = ("DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1", "DC0_H0_VM0", "DC0_H0_VM1")
SOAP = "fence_vmware_soap -o off (new process, login + WSDL each call)"
WARM = "vmfenced off on the warm session (daemon-side)"
WAIT_S = 10.0

Rows = dict[str, list[float]]


def soap_off(port: int, vm: str) -> float:
    argv = [FENCE_SOAP, "-a", "127.0.0.1", "-u", str(port), "--ssl-insecure"]
    argv += ["-l", USERNAME, "-p", PASSWORD, "-n", vm, "-o", "off"]
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    elapsed = (time.perf_counter() - start) * 1000
    if result.returncode != 0:
        raise RuntimeError(f"fence_vmware_soap {vm}: {result.stdout} {result.stderr}")
    return elapsed


async def setting(sim: Vcsim, workdir: Path, n: int) -> Rows:
    secret = workdir / "pw"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    config = HostConfig(
        name="vc1",
        address="127.0.0.1",
        port=sim.port,
        kind="vsphere",
        username=USERNAME,
        password_file=secret,
        tls_verify=False,
    )
    session = VSphereSession(config, PASSWORD, call_timeout=30)
    task = asyncio.create_task(session.supervise())
    rows: Rows = {SOAP: [], WARM: []}
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
    finally:
        await session.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return rows


def table(title: str, rows: Rows) -> str:
    lines = [
        f"\n### {title}\n",
        "| what | runs | median ms | p95 ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, values in rows.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {len(values)} | {median:.2f} | {percentile(values, 0.95):.2f} |")
    ratio = statistics.median(rows[SOAP]) / statistics.median(rows[WARM])
    lines += ["", f"fence_vmware_soap / vmfenced warm session: **{ratio:.0f}x**"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=10, help="runs per agent and setting (default 10)")
    parser.add_argument("--quick", action="store_true", help="2 of each: proves it still runs")
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
    with tempfile.TemporaryDirectory(prefix="bench-vsphere-") as tmp:
        for title, delay in settings:
            method_delay = None if delay is None else {"PowerOffVM_Task": delay}
            # A fresh vcsim per setting: its memory grows with every task.
            with Vcsim(done, wsdl=True, method_delay=method_delay) as sim:
                rows = asyncio.run(setting(sim, Path(tmp), n))
            out.append(table(title, rows))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
