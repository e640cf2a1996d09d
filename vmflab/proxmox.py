"""Lab Proxmox VE nodes: each a PID + mount + UTS namespace with a real sshd (root by key), the
shared ``/etc/pve`` tree, its own ``/var/run/qemu-server``, and VMs that are processes with
Proxmox's exact kvm command line (the kvm stand-in, or upstream qemu without ``-id``).

``ProxmoxHost`` is one node (a thin layer on ``SshdHost``, like ``LibvirtHost``);
``ProxmoxCluster`` builds the nodes of one lab and carries the cluster's verbs: create, destroy,
start, stop, rename, migrate, HA state, a node cut or powered off. The PID 1 of each node is the
lab's PID-1 program with ``vmflab.pid1.proxmox`` (which also runs the HA stand-in).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, Unpack

from vmflab import helper
from vmflab.control import LabError
from vmflab.pid1.proxmox import ProxmoxInit
from vmflab.proxmox_files import ProxmoxFiles, PveDirs
from vmflab.proxmox_tree import PveTree, TreeError, check_vmid, render_members
from vmflab.sshd import SshdHost, SshdHostArgs, SshSettings

KVM_SOURCE = Path(__file__).resolve().parent / "shims_pve" / "kvm.c"


class ProxmoxHost(SshdHost):
    """One lab Proxmox node; ``ProxmoxCluster`` builds, starts and tears it down."""

    kind: ClassVar[str] = "proxmox"
    ssh_timeout_s: ClassVar[float] = 30.0

    def __init__(self, *, files: ProxmoxFiles, **common: Unpack[SshdHostArgs]) -> None:
        SshdHost.__init__(self, files=files, **common)
        self.files = files
        self.powered_off = False
        self.cut_off = False  # unreachable: sshd (and, for the API stand-in, pveproxy) gone

    def launch(self, dirs: PveDirs, *, ha_round: float, ha_master: bool, accel: str) -> None:
        args = [
            *("--node", self.name, "--pve", str(dirs.tree), "--members", str(self.files.members)),
            *("--state", str(dirs.state), "--sbin", str(dirs.sbin), "--bin", str(dirs.bin)),
            *("--bashrc", str(self.files.bashrc), "--ha-round", f"{ha_round:g}"),
            *("--accel", accel),
        ]
        self._launch_sshd(ProxmoxInit, [*args, "--ha-master"] if ha_master else args)

    def _verb(self, line: str) -> str:
        answer = self._request(line, 40.0)
        if not answer.startswith("ok "):
            raise LabError(f"{line}: {answer}", host=self.name)
        return answer[3:]

    def start_vm(self, vmid: int, *, nocheck: bool = False) -> int:
        """Starts the VM here as ``qm start`` does (without the Perl start-up); its PID."""
        return int(self._verb(f"vm-start {check_vmid(vmid)}{' nocheck' if nocheck else ''}"))

    def kill_vm(self, vmid: int) -> bool:
        """SIGKILL of the VM's process here and the run files' cleanup; False if not running."""
        return self._verb(f"vm-kill {check_vmid(vmid)}") == "killed"

    def vm_pids(self) -> dict[int, int]:
        """VMID -> PID (in the node) of every VM process running here, by Proxmox's check."""
        return {int(k): v for k, v in json.loads(self._verb("vm-pids")).items()}

    def ha_rounds(self) -> int:
        """How many HA rounds this node's LRM has done."""
        return int(self._verb("ha-rounds"))

    def cmdline(self, pid: int) -> list[str]:
        """The process's argv on this node."""
        text = self.ssh(f"tr '\\0' '\\n' < /proc/{int(pid)}/cmdline").stdout
        return text.split("\n")[:-1]

    def qm(self, *args: str, check: bool = True) -> str:
        return self.ssh(shlex.join(["qm", *args]), check=check).stdout

    def __repr__(self) -> str:
        return f"ProxmoxHost({self.name!r}, {self.address}:{self.port})"


class ProxmoxCluster:
    """The lab's Proxmox nodes and their one ``/etc/pve``. ``ha_round``: seconds between HA
    rounds (Proxmox: 10); the first node runs the CRM."""

    def __init__(
        self,
        root: Path,
        names: Sequence[str],
        *,
        ssh_settings: SshSettings,
        new_address: Callable[[], str],
        pick_port: Callable[[str], int],
        ha_round: float = 10.0,
        accel: str = "kvm",
    ) -> None:
        self.dirs = PveDirs(root)
        self.tree = PveTree(self.dirs.tree, self.dirs.state)
        self.nodes: dict[str, ProxmoxHost] = {}
        self.members_version = 0
        self.ha_round = ha_round
        self.accel = accel
        self._names = list(names)
        self._ssh = ssh_settings
        self._new_address = new_address
        self._pick_port = pick_port

    def build(
        self,
        hosts_dir: Path,
        kvm_binary: Path,
        client_public_key: Path,
        helper_public_key: Path | None = None,
    ) -> None:
        """Files and host objects of every node (nothing runs yet). With `helper_public_key`,
        `vmfenced-host` at /usr/bin on every node (the cluster's shared overlay, as one path
        serves a real cluster whose authorized_keys is shared) and that key bound to it."""
        Path("/etc/pve").mkdir(mode=0o755, exist_ok=True)  # the mount point in every node
        self.dirs.prepare(kvm_binary)
        self.tree.create(self._names)
        for name in self._names:
            files = ProxmoxFiles(hosts_dir / name)
            files.prepare(client_public_key)
            if helper_public_key is not None:
                helper.install(
                    kind="proxmox",
                    bin_dir=self.dirs.bin,
                    ns_bin="/usr/bin",
                    authorized_keys=files.authorized_keys,
                    helper_public_key=helper_public_key,
                    busybox_ash=False,
                )
            address = self._new_address()
            self.nodes[name] = ProxmoxHost(
                name=name,
                address=address,
                port=self._pick_port(address),
                files=files,
                ssh_settings=self._ssh,
                pick_port=self._pick_port,
            )
        self.write_members()

    def start(self) -> None:
        for number, host in enumerate(self.nodes.values()):
            host.launch(self.dirs, ha_round=self.ha_round, ha_master=number == 0, accel=self.accel)
        for host in self.nodes.values():
            host.wait_ready()

    def write_members(self) -> None:
        """Every node's ``.members``, its version bumped (pmxcfs bumps it on every change)."""
        self.members_version += 1
        rows = [(n, h.address, not h.powered_off) for n, h in self.nodes.items()]
        for name, host in self.nodes.items():
            host.files.write_members(render_members(name, rows, self.members_version))

    def node(self, name: str) -> ProxmoxHost:
        return self.nodes[name]

    # ---------------------------------------------------------------------- VMs
    def create_vm(
        self, node: str, vmid: int, name: str | None, *, memory: int = 512, real_qemu: bool = False
    ) -> None:
        """Writes ``nodes/<node>/qemu-server/<vmid>.conf`` (``.vmlist`` follows); ``name`` None:
        no ``name:`` line (Proxmox then runs it as ``vm<vmid>``). ``real_qemu``: run by
        upstream qemu (without ``-id``)."""
        if self.tree.owner(vmid) is not None or vmid in self.tree.vmlist("lxc"):
            raise LabError(f"VMID {vmid} already exists")
        self._mark_real_qemu(vmid, real_qemu)
        options = {"memory": str(memory), "ostype": "l26", "cores": "1"}
        if name is not None:
            options["name"] = name
        options["smbios1"] = f"uuid=00000000-0000-4000-8000-{vmid:012d}"
        self.tree.write_conf(node, vmid, options)

    def create_ct(self, node: str, vmid: int, hostname: str) -> None:
        """An LXC container's config only (``.vmlist`` type ``lxc``): no process is run for it;
        the lab models containers as registrations that are not VMs."""
        try:
            self.tree.write_ct_conf(node, vmid, hostname)
        except TreeError as exc:
            raise LabError(str(exc)) from None

    def _mark_real_qemu(self, vmid: int, real: bool) -> None:
        path = self.dirs.state / "real-qemu"
        marked = set(path.read_text().split()) if path.exists() else set()
        marked = marked | {str(vmid)} if real else marked - {str(vmid)}
        path.write_text(" ".join(sorted(marked)) + "\n")

    def owner(self, vmid: int) -> ProxmoxHost:
        node = self.tree.owner(vmid)
        if node is None:
            raise LabError(f"VMID {vmid} has no config")
        return self.nodes[node]

    def start_vm(self, vmid: int) -> int:
        return self.owner(vmid).start_vm(vmid)

    def kill_vm(self, vmid: int) -> bool:
        return self.owner(vmid).kill_vm(vmid)

    def destroy_vm(self, vmid: int) -> None:
        """``qm destroy``: stopped first, then its HA resource and config go."""
        host = self.owner(vmid)
        if not host.powered_off:
            host.kill_vm(vmid)
        self.tree.set_ha(vmid, None)
        self.tree.remove_conf(vmid)

    def rename(self, vmid: int, name: str) -> None:
        """The config changes at once; a running process keeps its old ``-name``."""
        self.tree.set_option(vmid, "name", name)

    def begin_migration(self, vmid: int, target: str) -> int:
        """Live migration, first half: ``lock: migrate`` and the VM started on ``target``
        (``--migratedfrom``: its config is still the source's). Both nodes run the VMID until
        ``finish_migration``. Returns the target's PID."""
        if self.tree.owner(vmid) == target:
            raise LabError(f"VMID {vmid} is already on {target}")
        self.tree.set_option(vmid, "lock", "migrate")
        return self.nodes[target].start_vm(vmid, nocheck=True)

    def finish_migration(self, vmid: int, target: str) -> None:
        """Second half: the config moves to ``target`` (``.vmlist`` follows), the lock goes,
        the source's process is stopped."""
        source = self.owner(vmid)
        self.tree.move_conf(vmid, target)
        self.tree.set_option(vmid, "lock", None)
        source.kill_vm(vmid)

    def migrate(self, vmid: int, target: str) -> int:
        pid = self.begin_migration(vmid, target)
        self.finish_migration(vmid, target)
        return pid

    def set_ha(self, vmid: int, state: str | None) -> None:
        """Adds or changes the VM's HA resource (None: removes it)."""
        try:
            self.tree.set_ha(vmid, state)
        except TreeError as exc:
            raise LabError(str(exc)) from None

    # -------------------------------------------------------------------- nodes
    def power_off(self, name: str) -> None:
        """The node is gone: every process of it (VMs, sshd) dies with its namespace; the
        other nodes' ``.members`` show it offline."""
        host = self.nodes[name]
        host.close()
        host.powered_off = True
        self.write_members()

    def cut(self, name: str) -> None:
        """The node is unreachable (its sshd stopped; the API stand-in answers 595 for it)
        but its VMs run on."""
        host = self.nodes[name]
        host.stop_sshd()
        host.cut_off = True

    def restore(self, name: str) -> None:
        """A cut node reachable again."""
        host = self.nodes[name]
        host.start_sshd()
        host.cut_off = False

    def close(self) -> None:
        for host in self.nodes.values():
            host.kill()
        for host in self.nodes.values():
            host.close()
