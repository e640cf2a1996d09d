"""The host kinds a config may name (`kind = "..."`), each a module of this package."""

from __future__ import annotations

from vmfenced.backends import Backend, esx_classic, esxi, libvirt, proxmox

BACKENDS: dict[str, Backend] = {
    "esxi": esxi.BACKEND,
    "libvirt": libvirt.BACKEND,
    "esx-classic": esx_classic.BACKEND,
    "proxmox": proxmox.BACKEND,
}
