"""The blocking half of a vSphere session: pyvmomi calls run in the session's threads, and
the TLS context its connections use. Everything read is turned into plain records here and
checked before use (every byte a host sends is hostile input): vsphere_views rejects the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ssl
import time
from typing import Any

import pyVim.connect
import pyVmomi
import pyVmomi.SoapAdapter

from vmfenced.config import HostConfig
from vmfenced.daemon.vsphere_views import HostRecord, Inventory, VMRecord
from vmfenced.errors import LinkError

# pyvmomi's types are generated at run time; its partial annotations say less than they
# should (every managed property may be None), so its objects are handled as Any here and
# every value read is checked before use (vsphere_views).
vim: Any = pyVmomi.vim
vmodl: Any = pyVmomi.vmodl
SmartStubAdapter: Any = pyVim.connect.SmartStubAdapter
SoapStubAdapter: Any = pyVmomi.SoapAdapter.SoapStubAdapter
Disconnect: Any = pyVim.connect.Disconnect

VM_PROPS = ("name", "config.instanceUuid", "config.files.vmPathName", "runtime.powerState")
VM_HOST = "runtime.host"
HOST_PROPS = ("name", "runtime.connectionState")
TASK_POLL_S = 0.01


def ssl_context(config: HostConfig) -> ssl.SSLContext:
    """The system's CAs (or tls_ca_file) by default; a pinned thumbprint is checked on every
    connection's handshake, whatever CA signed it. pyvmomi's own `thumbprint` argument is not
    used: it checks the pin only when the context's verification fails, so with a context that
    does not verify, any certificate passed (pyvmomi 9.1)."""
    if config.tls_thumbprint is not None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the pin below replaces the CA check
        context.sslsocket_class = _pinned(bytes.fromhex(config.tls_thumbprint.replace(":", "")))
        return context
    if not config.tls_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # tls_verify = false: labs only, status warns
        return context
    return ssl.create_default_context(
        cafile=None if config.tls_ca_file is None else str(config.tls_ca_file)
    )


def _pinned(pin: bytes) -> type[ssl.SSLSocket]:
    class PinnedSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            der = self.getpeercert(binary_form=True)
            if der is None or not hmac.compare_digest(hashlib.sha256(der).digest(), pin):
                self.close()
                raise ssl.SSLCertVerificationError(
                    "the server's certificate does not match tls_thumbprint"
                )

    return PinnedSocket


def quiet_disconnect(si: Any) -> None:
    with contextlib.suppress(Exception):
        Disconnect(si)
    # Disconnect logs out but leaves the stub's pooled sockets open.
    with contextlib.suppress(Exception):
        si._stub.DropConnections()


def describe(exc: BaseException | None) -> str:
    message = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {' '.join(str(message).split())[:300]}"


def container_view(content: Any, datacenter: str | None) -> Any:
    root = content.rootFolder
    if datacenter is not None:
        found = [e for e in root.childEntity if isinstance(e, vim.Datacenter)]
        matches = [d for d in found if d.name == datacenter]
        if len(matches) != 1:
            raise LinkError("vsphere", "api", f"datacenter {datacenter!r}: {len(matches)} found")
        root = matches[0]
    return content.viewManager.CreateContainerView(root, [vim.VirtualMachine, vim.HostSystem], True)


def filter_spec(view: Any) -> Any:
    pc = vmodl.query.PropertyCollector
    traverse = pc.TraversalSpec(name="view", type=vim.view.ContainerView, path="view", skip=False)
    return pc.FilterSpec(
        objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[traverse])],
        propSet=[
            pc.PropertySpec(type=vim.VirtualMachine, pathSet=[*VM_PROPS, VM_HOST]),
            pc.PropertySpec(type=vim.HostSystem, pathSet=list(HOST_PROPS)),
        ],
    )


def read_inventory(si: Any, content: Any, view: Any) -> Inventory:
    collector = content.propertyCollector
    options = vmodl.query.PropertyCollector.RetrieveOptions()
    result = collector.RetrievePropertiesEx([filter_spec(view)], options)
    vms: dict[str, dict[str, Any]] = {}
    hosts: dict[str, dict[str, Any]] = {}
    while result is not None:
        for content_obj in result.objects:
            apply_props(content_obj.obj, content_obj.propSet, vms, hosts)
        if not result.token:
            break
        result = collector.ContinueRetrievePropertiesEx(result.token)
    return to_inventory(vms, hosts)


def apply_change(
    change: Any, vms: dict[str, dict[str, Any]], hosts: dict[str, dict[str, Any]]
) -> None:
    moref = change.obj._moId
    if change.kind == "leave":
        vms.pop(moref, None)
        hosts.pop(moref, None)
        return
    apply_props(change.obj, change.changeSet, vms, hosts)


def apply_props(
    obj: Any, props: Any, vms: dict[str, dict[str, Any]], hosts: dict[str, dict[str, Any]]
) -> None:
    table = vms if isinstance(obj, vim.VirtualMachine) else hosts
    record = table.setdefault(obj._moId, {})
    for prop in props:
        value = getattr(prop, "val", None)
        if getattr(prop, "op", "assign") == "remove":
            value = None
        # A managed object (the VM's host) is kept as its moref: the map holds plain data.
        record[prop.name] = value._moId if isinstance(value, vim.ManagedEntity) else value


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value and len(value) <= 1024 else None


def to_inventory(vms: dict[str, dict[str, Any]], hosts: dict[str, dict[str, Any]]) -> Inventory:
    """Plain records; a property of an unexpected type is kept as a value the views reject
    (every byte a host sends is hostile input)."""
    vm_records = {
        moref: VMRecord(
            moref=moref,
            name=_text(p.get("name")) or "",
            instance_uuid=_text(p.get("config.instanceUuid")),
            power_state=str(p.get("runtime.powerState")),
            host=_text(p.get(VM_HOST)),
            config_file=_text(p.get("config.files.vmPathName")) or "",
        )
        for moref, p in vms.items()
    }
    host_records = {
        moref: HostRecord(
            moref=moref,
            name=_text(p.get("name")) or moref,
            connection_state=str(p.get("runtime.connectionState")),
        )
        for moref, p in hosts.items()
    }
    return Inventory(vm_records, host_records)


def power(si: Any, moref: str, instance_uuid: str, method: str, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    vm = vim.VirtualMachine(moref, si._stub)
    # The moref must still be the VM the verdict chose: vCenter may have replaced it.
    if vm.config.instanceUuid != instance_uuid:
        raise LinkError("vsphere", "api", f"{moref} is no longer instance {instance_uuid}")
    try:
        task = getattr(vm, method)()
    except vim.fault.InvalidPowerState:
        task = None
    if task is not None:
        wait_task(task, deadline)
    state = vm.runtime.powerState
    return state if isinstance(state, str) else None


def wait_task(task: Any, deadline: float) -> None:
    """Polls the task's state with our own reads (not the default collector's WaitForUpdates,
    which would take another waiter's updates); the call's timeout bounds it."""
    while True:
        info = task.info
        if info.state == "success":
            return
        if info.state == "error":
            raise LinkError("vsphere", "api", f"task failed: {describe(info.error)}")
        if time.monotonic() > deadline:
            raise LinkError("vsphere", "api", f"task {info.key} still {info.state}")
        time.sleep(TASK_POLL_S)  # polling the task with the call's deadline above it
