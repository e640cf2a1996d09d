"""`off`, `status` and `on` of a VM of a vSphere entry, through the verdict module.

Every decision is the verdict's (vmfenced.daemon.verdict), on views made from a property read
taken for this request (vsphere_views). A power-off succeeds only when PowerOffVM_Task ended
and a fresh read of the VM's powerState says poweredOff, and a read after it shows no other
instance anywhere in the inventory.
"""

from __future__ import annotations

import asyncio

from vmfenced.daemon import vsphere_views
from vmfenced.daemon.verdict import (
    Decision,
    HostView,
    KillReport,
    Step,
    decide_off,
    decide_on,
    decide_status,
)
from vmfenced.daemon.vsphere import VSphereSession
from vmfenced.errors import LinkError

# A VM that moved under the power-off (SEARCH_AGAIN) is looked for again this many times.
SEARCHES = 2


async def _views(
    session: VSphereSession, vm: str
) -> tuple[vsphere_views.Inventory, list[HostView]]:
    inventory = await session.read()
    return inventory, vsphere_views.views(session.name, inventory, vm)


def _failed(session: VSphereSession, exc: LinkError) -> Decision:
    return Decision(Step.FAIL, reason=f"vSphere {session.name}: {exc.reason}", host=session.name)


async def off(session: VSphereSession, vm: str) -> Decision:
    try:
        for _ in range(SEARCHES + 1):
            inventory, views = await _views(session, vm)
            decision = decide_off(vm, views, known=bool(inventory.named(vm)))
            if decision.step is not Step.KILL or decision.target is None:
                return decision
            target = decision.target
            record = vsphere_views.find(inventory, target.vm)
            if record is None:
                return Decision(Step.FAIL, reason=f"{vm!r} cannot be told apart", host=target.host)
            try:
                state = await session.power_off(record.moref, target.vm.uuid or "")
                report = KillReport(target, vsphere_views.kill_outcome(state))
            except LinkError as exc:
                report = KillReport(target, None, exc.reason)
            inventory, views = await _views(session, vm)
            decision = decide_off(vm, views, report)
            if decision.step is not Step.SEARCH_AGAIN:
                return decision
        return Decision(Step.FAIL, reason=f"{vm!r} kept moving while it was powered off")
    except LinkError as exc:
        return _failed(session, exc)


async def status(session: VSphereSession, vm: str) -> Decision:
    try:
        inventory, views = await _views(session, vm)
    except LinkError as exc:
        return _failed(session, exc)
    return decide_status(vm, views, known=bool(inventory.named(vm)))


async def on(session: VSphereSession, vm: str) -> Decision:
    try:
        inventory, views = await _views(session, vm)
        decision = decide_on(vm, views, known=bool(inventory.named(vm)))
        if decision.step is not Step.POWER_ON or decision.registration is None:
            return decision
        record = inventory.vms.get(decision.registration.vmid)
        if record is None or record.instance_uuid is None:
            return Decision(Step.FAIL, reason=f"{vm!r} vanished before its power-on")
        state = await session.power_on(record.moref, record.instance_uuid)
    except LinkError as exc:
        return _failed(session, exc)
    if state not in vsphere_views.RUNNING_STATES:
        return Decision(Step.FAIL, reason=f"{vm!r} is {state} after PowerOnVM_Task")
    return decision


async def gather_off(session: VSphereSession, vms: list[str]) -> list[Decision]:
    """Several fences at once (each with its own reads): the bench's concurrent case."""
    return list(await asyncio.gather(*(off(session, vm) for vm in vms)))
