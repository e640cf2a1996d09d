"""fence_pve's Proxmox VE API, stood in for on the lab's nodes: HTTPS on 127.0.0.1 and a free
port, a self-signed certificate made per run (fence_pve runs with ``--ssl-insecure``).

Only what Debian's ``/usr/sbin/fence_pve`` calls (read from the agent: every call a new pycurl
handle, so a new TCP and TLS connection; the ticket as a ``Cookie`` and the CSRF token as a
header; ``status/stop`` and ``status/start`` posted without a body, ``skiplock`` never sent):

* ``POST access/ticket`` (form ``username``, ``password``) -> ticket and CSRFPreventionToken;
* ``GET nodes`` -> every node, ``online`` or ``offline``;
* ``GET nodes/<node>/qemu`` -> that node's VMs (vmid, name, status, pid...);
* ``GET nodes/<node>/qemu/<vmid>/status/current`` -> ``status`` running | stopped;
* ``POST nodes/<node>/qemu/<vmid>/status/{stop,start,reset}`` -> a task's UPID; the task then
  runs on its own, as pvedaemon's worker does: stop = the VM process killed on its node and its
  run files removed; for an HA-managed VM, stop queues ``crm-command stop vm:<vmid> 0`` and
  start sets the HA state (qemu-server's ``hastop``/``hastart``).

Answers carry Proxmox's JSON shapes: ``{"data": ...}``; an error is ``{"data": null}`` with the
message in the status line, 500 for "does not exist" and 595 when the node named in the URL
cannot be reached (``proxyto => 'node'``). Per-call costs (``ApiCosts``) stand for pveproxy's
own work; the TLS handshakes are real.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import ssl
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from vmflab.control import LabError
from vmflab.lifecycle import Started
from vmflab.proxmox import ProxmoxCluster, ProxmoxHost

PREFIX = "/api2/json/"
VM_PATH = re.compile(r"^nodes/([a-z][a-z0-9-]*)/qemu/([0-9]+)/status/(current|stop|start|reset)$")
VM_LIST = re.compile(r"^nodes/([a-z][a-z0-9-]*)/qemu$")


@dataclass(frozen=True)
class ApiCosts:
    """What each call costs besides the real TLS handshake, in seconds (our choice, no
    measured Proxmox figure exists in the sources): ``request`` pveproxy's per-request work
    (ticket check, permissions, JSON; Perl), ``ticket`` a root@pam login (PAM's password hash
    and the ticket's RSA signature), ``proxy`` one more HTTPS hop when the URL names another
    node than the one asked, ``worker`` the fork of a task (UPID, task log) before it acts."""

    request: float = 0.005
    ticket: float = 0.05
    proxy: float = 0.01
    worker: float = 0.05


NO_COSTS = ApiCosts(0.0, 0.0, 0.0, 0.0)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        Exception.__init__(self, message)
        self.status = status
        self.message = message


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed RSA-2048 certificate (as pve-ssl.pem) for 127.0.0.1, made now."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "pve-ssl.pem", directory / "pve-ssl.key"
    done = subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise LabError(f"openssl req failed: {done.stderr.strip()}")
    return cert, key


class PveApi(Started):
    """The API of node ``local`` of the lab's Proxmox cluster; ``with PveApi(...) as api``."""

    def __init__(
        self,
        cluster: ProxmoxCluster,
        workdir: Path,
        *,
        local: str,
        password: str | None = None,
        costs: ApiCosts = ApiCosts(),
    ) -> None:
        self.cluster = cluster
        self.local = local
        self.username = "root@pam"
        self.password = password or secrets.token_urlsafe(12)
        self.costs = costs
        self.calls: list[str] = []  # "METHOD path" of every call, in order
        self._workdir = workdir
        self._tickets: set[str] = set()
        self._csrf: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []

    @property
    def port(self) -> int:
        if self._server is None:
            raise LabError("API not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        cert, key = make_certificate(self._workdir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.serve(self, "GET")

            def do_POST(self) -> None:
                api.serve(self, "POST")

            def log_message(self, format: str, *args: Any) -> None:
                del format, args  # the calls are recorded in ``calls``

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="pve-api", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for worker in self._workers:
            worker.join(30)

    def argv(self, vmid: int, action: str, *, node: str | None = None) -> list[str]:
        """Debian's fence_pve against this API; ``node`` None: ``--pve-node-auto``."""
        where = ["--pve-node-auto"] if node is None else ["--pve-node", node]
        return [
            *("/usr/sbin/fence_pve", "--ip", "127.0.0.1", "--ipport", str(self.port)),
            *("--username", self.username, "--password", self.password, "--ssl-insecure"),
            *where,
            *("--plug", str(vmid), "--action", action),
        ]

    # ------------------------------------------------------------------ serving
    def serve(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        path = urllib.parse.urlsplit(handler.path).path
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length).decode() if length else ""
        with self._lock:
            self.calls.append(f"{method} {path}")
        time.sleep(self.costs.request)  # pveproxy's own work on every call (see ApiCosts)
        try:
            if not path.startswith(PREFIX):
                raise ApiError(501, "Method not implemented")
            status, data = self.route(method, path[len(PREFIX) :], body, handler)
        except ApiError as exc:
            status, data, reason = exc.status, None, exc.message
        else:
            reason = "OK"
        payload = json.dumps({"data": data}).encode()
        handler.send_response(status, reason.replace("\n", " "))
        handler.send_header("Content-Type", "application/json;charset=UTF-8")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def route(
        self, method: str, path: str, body: str, handler: BaseHTTPRequestHandler
    ) -> tuple[int, Any]:
        if method == "POST" and path == "access/ticket":
            return 200, self.ticket(body)
        self.check_auth(handler, csrf=method == "POST")
        if method == "GET" and path == "nodes":
            return 200, self.node_list()
        match = VM_LIST.match(path)
        if method == "GET" and match:
            return 200, self.vm_list(self.reach(match.group(1)))
        match = VM_PATH.match(path)
        if match:
            host, vmid, verb = self.reach(match.group(1)), int(match.group(2)), match.group(3)
            if method == "GET" and verb == "current":
                return 200, self.current(host, vmid)
            if method == "POST" and verb != "current":
                return 200, self.task(host, vmid, verb)
        raise ApiError(501, f"Method '{method} /{path}' not implemented")

    def ticket(self, body: str) -> dict[str, Any]:
        form = urllib.parse.parse_qs(body)
        time.sleep(self.costs.ticket)
        if form.get("username") != [self.username] or form.get("password") != [self.password]:
            raise ApiError(401, "authentication failure")
        stamp = f"{int(time.time()):08X}"
        signature = base64.b64encode(secrets.token_bytes(256)).decode()
        ticket = f"PVE:{self.username}:{stamp}::{signature}"
        csrf = f"{stamp}:{base64.b64encode(secrets.token_bytes(20)).decode().rstrip('=')}"
        with self._lock:
            self._tickets.add(ticket)
            self._csrf.add(csrf)
        return {
            "username": self.username,
            "ticket": ticket,
            "CSRFPreventionToken": csrf,
            "clustername": "vmflab",
            "cap": {"vms": {"VM.PowerMgmt": 1, "VM.Audit": 1}},
        }

    def check_auth(self, handler: BaseHTTPRequestHandler, *, csrf: bool) -> None:
        cookies = dict(
            part.strip().split("=", 1)
            for part in (handler.headers.get("Cookie") or "").split(";")
            if "=" in part
        )
        if cookies.get("PVEAuthCookie") not in self._tickets:
            raise ApiError(401, "No ticket")
        if csrf and handler.headers.get("CSRFPreventionToken") not in self._csrf:
            raise ApiError(401, "Permission check failed (invalid csrf token)")

    def reach(self, node: str) -> ProxmoxHost:
        """The node named in the URL, which must answer (``proxyto => 'node'``)."""
        host = self.cluster.nodes.get(node)
        if host is None:
            raise ApiError(500, f"hostname lookup '{node}' failed - unknown node")
        if host.powered_off or host.cut_off or host.unshare_pid is None:
            raise ApiError(595, f"Connection refused (node {node} is offline)")
        if node != self.local:
            time.sleep(self.costs.proxy)
        return host

    def node_list(self) -> list[dict[str, Any]]:
        rows = []
        for name, host in self.cluster.nodes.items():
            online = not host.powered_off
            row: dict[str, Any] = {"node": name, "id": f"node/{name}", "type": "node"}
            row["status"] = "online" if online else "offline"
            if online:
                row.update(level="", maxcpu=os.cpu_count() or 1, cpu=0.01, uptime=100)
            rows.append(row)
        return rows

    def vm_row(self, host: ProxmoxHost, vmid: int, pids: dict[int, int]) -> dict[str, Any]:
        options = self.cluster.tree.read_conf(vmid)[1]
        pid = pids.get(vmid)
        memory = int(options.get("memory", "512")) * 1024 * 1024
        row: dict[str, Any] = {
            "vmid": vmid,
            "name": options.get("name") or f"VM {vmid}",
            "status": "stopped" if pid is None else "running",
            "cpus": 1,
            "maxmem": memory,
            "maxdisk": 0,
            "uptime": 0 if pid is None else 1,
        }
        if pid is not None:
            row["pid"] = pid
        del host
        return row

    def vm_list(self, host: ProxmoxHost) -> list[dict[str, Any]]:
        pids = host.vm_pids()
        tree = self.cluster.tree
        mine = sorted(v for v, node in tree.vmlist().items() if node == host.name)
        return [self.vm_row(host, vmid, pids) for vmid in mine]

    def owned(self, host: ProxmoxHost, vmid: int) -> None:
        if self.cluster.tree.owner(vmid) != host.name:
            raise ApiError(
                500,
                f"Configuration file 'nodes/{host.name}/qemu-server/{vmid}.conf' does not exist",
            )

    def current(self, host: ProxmoxHost, vmid: int) -> dict[str, Any]:
        self.owned(host, vmid)
        row = self.vm_row(host, vmid, host.vm_pids())
        row["qmpstatus"] = row["status"]
        state = self.cluster.tree.ha_state(vmid)
        row["ha"] = {"managed": 0} if state is None else {"managed": 1, "state": state}
        return row

    def task(self, host: ProxmoxHost, vmid: int, verb: str) -> str:
        """A UPID now; the work in a worker thread, as pvedaemon forks a task."""
        self.owned(host, vmid)
        ha = self.cluster.tree.ha_state(vmid) is not None
        kind = {"stop": "qmstop", "start": "qmstart", "reset": "qmreset"}[verb]
        if ha and verb in ("stop", "start"):
            kind = "hastop" if verb == "stop" else "hastart"
        upid = f"UPID:{host.name}:{os.getpid():08X}:{secrets.randbelow(2**32):08X}:"
        upid += f"{int(time.time()):08X}:{kind}:{vmid}:{self.username}:"

        def work() -> None:
            time.sleep(self.costs.worker)
            try:
                self.run_task(host, vmid, kind)
            except LabError as exc:
                with self._lock:
                    self.calls.append(f"TASK {upid} failed: {exc}")

        worker = threading.Thread(target=work, name=f"pve-task-{kind}-{vmid}", daemon=True)
        self._workers.append(worker)
        worker.start()
        return upid

    def run_task(self, host: ProxmoxHost, vmid: int, kind: str) -> None:
        tree = self.cluster.tree
        if kind == "hastop":
            tree.queue_crm_command(f"stop vm:{vmid} 0")
        elif kind == "hastart":
            tree.set_ha(vmid, "started")
        elif kind == "qmstop":
            host.kill_vm(vmid)
        elif kind == "qmstart":
            host.start_vm(vmid)
        # qmreset: QMP system_reset, a new boot inside the same kvm process: nothing to do.
