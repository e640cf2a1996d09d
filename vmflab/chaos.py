"""The fault generator: a seeded random schedule of faults, fences and status requests run against
a real daemon on the real-sshd lab, every reply checked by the truth oracle (``vmflab.oracle``).

``random.Random(seed)`` draws every operation in the main thread, so a seed fixes the schedule;
what the threads of a concurrent burst interleave with is up to the machine. Operations: start a
VM (on a configured host or one outside the config), out-of-band kill, migrate (start on the
target then kill on the source, or the reverse: brief twins either way; to a configured host or
one outside the config; source unregistered or not), a twin on another host, a duplicate display
name on one host, a dead VM's PID reused by another VM or by an unrelated process, hostile
names, a frozen host, a dead sshd restarted later, single and concurrent fences and statuses of
one VM or many (some while a lab operation runs). See docs/faults.md.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from random import Random
from typing import Any

from vmflab.chaos_lab import LAB_ERRORS, Skip, World
from vmflab.chaos_names import hostile_name
from vmflab.control import LabError
from vmflab.daemon import LabDaemon
from vmflab.lab import Lab
from vmflab.libvirt_files import check_domain_name
from vmflab.oracle import Instance, Oracle, Tally
from vmflab.vmfs import check_vm_name

FAST_KEEPALIVE = {"keepalive_interval": 0.5, "keepalive_count_max": 2}
BASE_NAMES = {"esxi": [f"e{i}" for i in range(1, 9)], "libvirt": [f"k{i}" for i in range(1, 5)]}
CAPS = {"esxi": 30, "libvirt": 10}  # live VMs at once: qemu VMs cost 35 MiB each
LAB_ERROR_LINES = 10
WEIGHTS = {
    "start": 16,
    "kill": 9,
    "migrate": 10,
    "twin on another configured host": 3,
    "duplicate name on one host": 4,
    "PID reused by a VM": 4,
    "PID reused by an unrelated process": 4,
    "hostile name": 6,
    "freeze a host": 2,
    "kill sshd, restart it later": 2,
    "fence": 20,
    "status": 12,
    "concurrent requests, one VM": 4,
    "concurrent requests, many VMs": 4,
}


@dataclass(frozen=True)
class Settings:
    seed: int
    ops: int
    max_seconds: float = 600.0  # the run stops drawing after this, whatever ``ops`` says
    fence_timeout: float = 2.0
    inventory_interval: float = 2.0


class Chaos:
    """One run: ``Chaos(lab, configured, settings).run()`` returns the tally."""

    def __init__(self, lab: Lab, configured: list[str], settings: Settings) -> None:
        self.lab = lab
        self.configured = configured
        self.settings = settings
        self.rng = Random(settings.seed)
        self.oracle = Oracle(set(configured), registered=self._registered)
        self.world = World(lab, self.oracle, set(configured))
        self.pool = {kind: list(BASE_NAMES[kind]) for kind in self.world.kinds()}
        self.ghosts = ["never-started"]  # names nothing runs: hostile ones the lab refused, too
        self.serial = 0
        self.seconds = 0.0
        self._daemon: LabDaemon | None = None
        self._lab_errors = 0
        self._ops: dict[str, Callable[[], str]] = {
            "start": self.op_start,
            "kill": self.op_kill,
            "migrate": self.op_migrate,
            "twin on another configured host": self.op_twin,
            "duplicate name on one host": self.op_duplicate,
            "PID reused by a VM": self.op_reuse_vm,
            "PID reused by an unrelated process": self.op_reuse_other,
            "hostile name": self.op_hostile,
            "freeze a host": self.op_freeze,
            "kill sshd, restart it later": self.op_sshd,
            "fence": lambda: self.ask("fence", self.pick_name()),
            "status": lambda: self.ask("vm_status", self.pick_name()),
            "concurrent requests, one VM": self.op_burst_one,
            "concurrent requests, many VMs": self.op_burst_many,
        }

    def _registered(self, vm: str) -> bool:
        return self.world.registered(vm)

    @property
    def tally(self) -> Tally:
        return self.oracle.tally

    def run(self) -> Tally:
        start = time.monotonic()
        for host in self.configured:  # a few VMs the daemon's first inventory sees
            kind = self.world.kind_of(host)
            for name in self.rng.sample(self.pool[kind], 2 if kind == "esxi" else 1):
                self.step("start", functools.partial(self._first, host, name))
        daemon = LabDaemon(
            self.lab,
            hosts=self.configured,
            ssh=FAST_KEEPALIVE,
            daemon={
                "fence_timeout": self.settings.fence_timeout,
                "inventory_interval": self.settings.inventory_interval,
            },
        )
        daemon.log_level = "info"
        with daemon:
            self._daemon = daemon
            try:
                for done in range(self.settings.ops):
                    if time.monotonic() - start > self.settings.max_seconds:
                        self.tally.skipped["(time bound reached)"] += self.settings.ops - done
                        break
                    self._heal()
                    name = self.rng.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]
                    if self._thin() and self.rng.random() < 0.5:
                        name = "start"  # fences and kills drain the lab: keep VMs to fence
                    self.step(name, self._ops[name])
                    self.oracle.sweep()
            finally:
                self.world.heal(everything=True)
            self.oracle.sweep()
            if daemon.proc is None or daemon.proc.poll() is not None:
                raise LabError(f"the daemon died during the run:\n{daemon.log()}")
        self.seconds = time.monotonic() - start
        return self.tally

    def _heal(self) -> None:
        try:
            self.world.heal()
        except LAB_ERRORS as exc:  # the host stays broken: requests that need it fail
            self.tally.skipped["end of a fault: lab error"] += 1
            print(f"vmflab.chaos: end of a fault: {exc}"[:400], file=sys.stderr)

    def _thin(self) -> bool:
        """Fewer live VMs of some kind than two per host (or half its cap)."""
        hosts = self.world.hosts.values()
        return any(
            len(self.live(kind)) < min(2 * sum(1 for h in hosts if h.kind == kind), CAPS[kind] // 2)
            for kind in self.world.kinds()
        )

    def step(self, name: str, op: Callable[[], str | None]) -> None:
        """Runs one operation; counted under the label it returns (or its name)."""
        try:
            label = op() or name
        except Skip as exc:
            self.tally.skipped[f"{name}: {exc}"] += 1
            return
        except LAB_ERRORS as exc:
            self.tally.skipped[f"{name}: lab error"] += 1
            self._lab_errors += 1
            if self._lab_errors <= LAB_ERROR_LINES:
                print(f"vmflab.chaos: {name}: {exc}"[:400], file=sys.stderr)
            return
        self.tally.ops[label] += 1

    # ------------------------------------------------------------------------- choices
    def choose(self, items: list[Any], why: str) -> Any:
        if not items:
            raise Skip(why)
        return self.rng.choice(items)

    def live(self, kind: str | None = None, *, usable: bool = False) -> list[Instance]:
        found = self.oracle.live()
        if kind is not None:
            found = [i for i in found if self.world.kind_of(i.host) == kind]
        if usable:
            found = [i for i in found if i.host not in self.world.faults]
        return sorted(found, key=lambda i: (i.host, i.vm, i.pid))

    def pick_name(self) -> str:
        draw = self.rng.random()
        running = sorted({i.vm for i in self.live()})
        if draw < 0.75 and running:
            return str(self.rng.choice(running))
        if draw < 0.95:
            return str(self.rng.choice(sorted({n for p in self.pool.values() for n in p})))
        return str(self.rng.choice(self.ghosts))

    def host_for(self, kind: str, *, outside: float, avoid: set[str]) -> str:
        """A usable host of ``kind`` not in ``avoid``: outside the config with odds ``outside``."""
        hosts = self.world.usable(kind, configured=self.rng.random() >= outside)
        return str(self.choose([h for h in hosts if h not in avoid], f"no usable {kind} host"))

    def _start(self, host: str, name: str, *, pid: int | None = None) -> Instance:
        if len(self.live(self.world.kind_of(host))) >= CAPS[self.world.kind_of(host)]:
            raise Skip("at the cap of live VMs")
        return self.world.start(host, name, pid=pid)

    def _first(self, host: str, name: str) -> str:
        self._start(host, name)
        return "start before the daemon"

    # ------------------------------------------------------------------------ requests
    def ask(self, op: str, vm: str) -> str:
        """One request to the daemon, checked by the oracle as soon as its reply arrives."""
        daemon = self._daemon
        assert daemon is not None
        request = {"op": op, "vm": vm, **({"action": "off"} if op == "fence" else {})}
        window = self.oracle.sent(op, vm)
        try:
            reply: dict[str, Any] | None = daemon.request(request, timeout=60)
        except (OSError, ValueError):
            reply = None
        self.oracle.replied(window, reply)
        return op if op == "fence" else "status"

    def concurrent(self, requests: list[tuple[str, str]], label: str) -> str:
        """The requests at once; meanwhile, half the time, a lab operation races them."""
        during = self.rng.choice([None, "kill", "migrate", "start", "PID reused by a VM"])
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = [pool.submit(self.ask, op, vm) for op, vm in requests]
            if during is not None:
                self.step(during, self._ops[during])
            for future in futures:
                future.result()
        return label + (f", during a {during}" if during else "")

    def op_burst_one(self) -> str:
        vm = self.pick_name()
        count = self.rng.randint(2, 8)
        ops = [self.rng.choice(["fence", "fence", "vm_status"]) for _ in range(count)]
        return self.concurrent([(op, vm) for op in ops], "concurrent requests, one VM")

    def op_burst_many(self) -> str:
        count = self.rng.randint(3, 12)
        ops = ["fence", "vm_status"]
        requests = [(self.rng.choice(ops), self.pick_name()) for _ in range(count)]
        return self.concurrent(requests, "concurrent requests, many VMs")

    # ---------------------------------------------------------------------- lab changes
    def op_start(self) -> str:
        kind = self.rng.choice(self.world.kinds())
        host = self.host_for(kind, outside=0.15, avoid=set())
        names = [n for n in self.pool[kind] if not self.world.running_on(host, n)]
        self._start(host, self.choose(names, "every name runs there"))
        return "start" if host in self.configured else "start outside the config"

    def op_kill(self) -> str:
        self.world.kill(self.choose(self.live(), "nothing runs"))
        return "out-of-band kill (SIGKILL)"

    def op_migrate(self) -> str:
        source = self.choose(self.live(usable=True), "nothing runs on a usable host")
        kind = self.world.kind_of(source.host)
        busy = {i.host for i in self.live() if i.vm == source.vm}
        target = self.host_for(kind, outside=0.35, avoid=busy)
        start_first = self.rng.random() < 0.5
        unregister = self.rng.random() < 0.5
        if start_first:
            self._start(target, source.vm)
        self.world.kill(source)
        if unregister:
            self.world.unregister(source.host, source.vm)
        if not start_first:
            self._start(target, source.vm)
        where = "configured host" if target in self.configured else "host outside the config"
        return f"migrate to a {where} ({'start' if start_first else 'kill'} first)"

    def op_twin(self) -> str:
        source = self.choose(self.live(), "nothing runs")
        kind = self.world.kind_of(source.host)
        busy = {i.host for i in self.live() if i.vm == source.vm}
        self._start(self.host_for(kind, outside=0.0, avoid=busy), source.vm)
        return "twin on another configured host"

    def op_duplicate(self) -> str:
        source = self.choose(self.live("esxi", usable=True), "no ESXi VM on a usable host")
        self._start(source.host, source.vm)
        return "duplicate name on one host"

    def _reusable(self, kind: str | None) -> Instance:
        usable = [i for i in self.live(kind, usable=True) if i.host in self.configured]
        victim: Instance = self.choose(usable, "no VM on a usable configured host")
        self.world.kill(victim)
        self.world.wait_gone(victim, reaped=True)
        return victim

    def op_reuse_vm(self) -> str:
        victim = self._reusable("esxi")
        names = [n for n in self.pool["esxi"] if not self.world.running_on(victim.host, n)]
        name = self.choose(names, "every name runs there")
        intruder = self._start(victim.host, name, pid=victim.pid)
        if intruder.pid != victim.pid:
            self.tally.skipped["PID reused by a VM: another process took the PID first"] += 1
        self.ask(self.rng.choice(["fence", "vm_status"]), victim.vm)
        return "PID reused by a VM"

    def op_reuse_other(self) -> str:
        victim = self._reusable(None)
        self.world.intruder(victim.host, victim.pid)
        self.ask(self.rng.choice(["fence", "vm_status"]), victim.vm)
        return "PID reused by an unrelated process"

    def op_hostile(self) -> str:
        kind = self.rng.choice(self.world.kinds())
        victim = self.choose(self.live(kind), f"no {kind} VM to name")
        self.serial += 1
        hostile = hostile_name(self.rng, kind, self.serial, victim.vm, victim.pid)
        esxi_display_names = kind == "esxi" and self.world.display_names
        # With display names apart from file names, the lab itself says which it refuses.
        refused = [] if esxi_display_names else refused_characters(kind, hostile.name)
        if refused:
            self.ghosts.append(hostile.name)
            for char in refused:
                self.tally.hostile[f"refused by the {kind} lab: {char}"] += 1
            raise Skip(f"the {kind} lab refuses some of its characters")
        host = self.host_for(kind, outside=0.1, avoid=set())
        instance = self._start(host, hostile.name)
        self.pool[kind].append(hostile.name)
        self.tally.hostile[f"started on {kind}: {hostile.klass}"] += 1
        for _ in range(2):
            target = self.rng.choice([hostile.name, hostile.name, victim.vm])
            self.ask(self.rng.choice(["fence", "vm_status"]), target)
        if self.rng.random() < 0.5:
            # Gone again, config and all: a name the daemon cannot read fails the listings of
            # its host while it is there, which would hide every other class on that host.
            self.world.kill(instance)
            self.world.unregister(host, hostile.name)
        return f"hostile name ({kind})"

    def _fault_host(self) -> str:
        if self.world.faults:
            raise Skip("another host is already down")
        outside = self.rng.random() < 0.2
        kinds = self.world.kinds()
        hosts = [h for k in kinds for h in self.world.usable(k, configured=not outside)]
        host = str(self.choose(hosts, "no usable host"))
        self._listed_now()
        return host

    def _listed_now(self) -> None:
        """Every configured host listed after the last VM the schedule started, before a host
        goes silent: a host that cannot answer is trusted to run what its latest listing
        showed (docs/safety.md, the rule for `killed`), so a VM started there and hidden by
        the silence before any listing is the one case the rules accept not to see. A status
        request for a name no VM has makes the daemon list every host; not checked by the
        oracle (it is not part of the schedule)."""
        daemon = self._daemon
        assert daemon is not None
        daemon.request({"op": "vm_status", "vm": SYNC_NAME}, timeout=60)

    def op_freeze(self) -> str:
        self.world.freeze(self._fault_host(), self.rng.uniform(0.3, 2.5))
        return "freeze a host"

    def op_sshd(self) -> str:
        self.world.kill_sshd(self._fault_host(), self.rng.uniform(0.3, 2.0))
        return "kill sshd, restart it later"


# A name no VM of the schedule ever has: asking its status lists every host.
SYNC_NAME = "vmf-chaos-sync"


def refused_characters(kind: str, name: str) -> list[str]:
    """The characters of ``name`` the lab refuses in a VM name of ``kind``, escaped."""
    check = check_vm_name if kind == "esxi" else check_domain_name
    bad = []
    for char in sorted(set(name)):
        try:
            check(f"a{char}a")
        except LabError:
            bad.append(char.encode("unicode_escape").decode())
    return bad
