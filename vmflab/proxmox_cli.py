"""The ``qm`` and ``ha-manager`` stand-ins of a lab Proxmox node (stdlib only).

``/usr/sbin/qm`` and ``/usr/sbin/ha-manager`` inside a node are small scripts
(``vmflab.proxmox_files.tool_script``) that first pay a Perl start-up (``perl`` loading core
modules, as the real Perl tools do before their first line of work), then run this module with
``python3 -I -S``. Outputs follow qemu-server's and pve-ha-manager's format strings
(../shared/reference/proxmox.md §4, §5); errors go to stderr and exit 255, as a Perl ``die``
through PVE::CLIHandler does.

Commands: ``qm list``; ``qm status <vmid>``; ``qm start <vmid>``; ``qm stop <vmid>
[--timeout N] [--skiplock]``; ``ha-manager add|set vm:<vmid> [--state S]``; ``ha-manager remove
vm:<vmid>``; ``ha-manager crm-command stop vm:<vmid> <timeout>``; ``ha-manager status``.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

from vmflab import proxmox_node as runtime
from vmflab.proxmox_tree import HA_STATES, PveTree, TreeError, check_vmid

DIE = 255


def nodename() -> str:
    """``PVE::INotify::nodename``: the node's hostname (the node's init sets it)."""
    return socket.gethostname().split(".")[0]


def sid_vmid(sid: str) -> int:
    kind, _, vmid = sid.partition(":")
    if kind != "vm":
        raise TreeError(f"unable to parse service id '{sid}'")
    return check_vmid(vmid)


def qm_list(tree: PveTree, node: str) -> str:
    vms = runtime.local_vms(tree, node)
    if not vms:
        return ""  # qm list prints nothing at all, not even the header
    # qm.pm's printf formats, verbatim.
    head = ("VMID", "NAME", "STATUS", "MEM(MB)", "BOOTDISK(GB)", "PID")
    out = ["%10s %-20s %-10s %-10s %12s %-10s\n" % head]  # noqa: UP031
    for vmid, options in sorted(vms.items()):
        pid = runtime.running_pid(vmid)
        name = options.get("name") or f"VM {vmid}"
        status = "stopped" if pid is None else "running"
        row = (vmid, name, status, int(options.get("memory", "512")), 0.0, pid or 0)
        out.append("%10s %-20s %-10s %-10s %12.2f %-10s\n" % row)  # noqa: UP031
    return "".join(out)


def check_quorum(tree: PveTree) -> None:
    """What changes the tree needs quorum (``check_cfs_quorum``)."""
    if not tree.quorate():
        raise TreeError("cluster not ready - no quorum?")


def qm(tree: PveTree, node: str, args: list[str]) -> int:
    match args:
        case ["list"]:
            sys.stdout.write(qm_list(tree, node))
        case ["status", vmid]:
            owner, _ = tree.read_conf(check_vmid(vmid))
            if owner != node:
                raise TreeError(
                    f"Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist"
                )
            pid = runtime.running_pid(int(vmid))
            print(f"status: {'stopped' if pid is None else 'running'}")
        case ["start", vmid]:
            number = check_vmid(vmid)
            check_quorum(tree)
            if tree.ha_state(number) is not None:
                print(f"Requesting HA start for VM {number}")
                tree.set_ha(number, "started")
                return 0
            runtime.start(tree, node, number)
        case ["stop", vmid, *options]:
            return qm_stop(tree, node, check_vmid(vmid), options)
        case _:
            raise TreeError(f"unknown qm command {args!r}")
    return 0


def qm_stop(tree: PveTree, node: str, vmid: int, options: list[str]) -> int:
    timeout = runtime.STOP_TIMEOUT_S
    skiplock = False
    while options:
        option = options.pop(0)
        if option == "--skiplock":
            skiplock = True
        elif option == "--timeout" and options:
            timeout = int(options.pop(0))
        else:
            raise TreeError(f"unknown option {option!r}")
    owner, conf = tree.read_conf(vmid)
    if owner != node:
        raise TreeError(f"Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist")
    if tree.ha_state(vmid) is not None:
        check_quorum(tree)
        print(f"Requesting HA stop for VM {vmid}")
        tree.queue_crm_command(f"stop vm:{vmid} 0")
        return 0
    if "lock" in conf and not skiplock:
        raise TreeError(f"VM is locked ({conf['lock']})")
    runtime.stop(vmid, timeout=timeout)
    return 0


def ha_manager(tree: PveTree, node: str, args: list[str]) -> int:
    if args[:1] != ["status"]:
        check_quorum(tree)
    match args:
        case ["add" | "set" as verb, sid, *rest]:
            vmid = sid_vmid(sid)
            state = "started"
            if rest[:1] == ["--state"] and len(rest) == 2:
                state = rest[1]
            elif rest:
                raise TreeError(f"unknown options {rest!r}")
            if state not in HA_STATES:
                raise TreeError(f"invalid state {state!r}")
            known = vmid in tree.ha_resources()
            if verb == "add" and known:
                raise TreeError(f"resource ID 'vm:{vmid}' already defined")
            if verb == "set" and not known:
                raise TreeError(f"no such resource 'vm:{vmid}'")
            tree.set_ha(vmid, state)
        case ["remove", sid]:
            tree.set_ha(sid_vmid(sid), None)
        case ["crm-command", "stop", sid, timeout]:
            if not timeout.isdigit():
                raise TreeError(f"invalid timeout {timeout!r}")
            tree.queue_crm_command(f"stop vm:{sid_vmid(sid)} {timeout}")
        case ["status"]:
            now = time.strftime("%a %b %d %H:%M:%S %Y")
            lines = ["quorum OK", f"master {tree.nodes()[0]} (active, {now})"]
            lines += [f"lrm {n} (active, {now})" for n in tree.nodes()]
            for vmid, resource in sorted(tree.ha_resources().items()):
                owner = tree.owner(vmid) or "?"
                lines.append(f"service vm:{vmid} ({owner}, {resource.state})")
            print("\n".join(lines))
        case _:
            raise TreeError(f"unknown ha-manager command {args!r}")
    return 0


def main(argv: list[str]) -> int:
    """``argv``: the tool (qm | ha-manager), the lab's state directory, then the tool's
    arguments."""
    tool, state, *args = argv
    tree = PveTree(Path("/etc/pve"), Path(state))
    try:
        if tool == "qm":
            return qm(tree, nodename(), args)
        return ha_manager(tree, nodename(), args)
    except (TreeError, OSError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return DIE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
