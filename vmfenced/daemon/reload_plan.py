"""Reload: read and check a whole new config, then say what changes. Pure decisions, no I/O
beyond reading the files the config names; the daemon applies the plan.

A host is *unchanged* when its entry, its effective SSH settings and its key material are all
the same: its links and lanes stay as they are. Any SSH-level difference means *replaced*
(new connections). Keys that cannot change while the daemon runs refuse the whole reload.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import asyncssh

from vmfenced.config import Config, HostConfig, SSHConfig, check_environment, load
from vmfenced.errors import ConfigError, StartupError

# Changing these live would strand clients or the fence journal: a restart is needed.
FIXED = ("socket", "state_directory")


def load_keys(config: Config) -> dict[Path, asyncssh.SSHKey]:
    keys: dict[Path, asyncssh.SSHKey] = {}
    for host in config.hosts:
        if host.kind == "vsphere":
            continue  # a password file, no SSH key
        for path in config.ssh_for(host).client_keys:
            if path in keys:
                continue
            try:
                keys[path] = asyncssh.read_private_key(path)
            except (OSError, asyncssh.KeyImportError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                raise StartupError(f"cannot read client key {path}: {reason}") from None
    return keys


def prepare(path: Path) -> tuple[Config, dict[Path, asyncssh.SSHKey]]:
    """Everything a start needs from the files; ConfigError lists every problem."""
    config = load(path)
    problems = check_environment(config)
    if problems:
        raise ConfigError(str(path), problems)
    try:
        keys = load_keys(config)
    except StartupError as exc:
        raise ConfigError(str(path), [str(exc)]) from None
    return config, keys


@dataclass(frozen=True)
class ReloadPlan:
    config: Config
    keys: dict[Path, asyncssh.SSHKey]
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    # Other keys whose value changes, named like the config file does ("daemon.fence_timeout").
    settings: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.replaced or self.settings)

    def summary(self) -> dict[str, object]:
        return {
            "changed": self.changed,
            "added": list(self.added),
            "removed": list(self.removed),
            "replaced": list(self.replaced),
            "unchanged": list(self.unchanged),
            "settings": list(self.settings),
        }


def plan(
    old: Config,
    old_keys: dict[Path, asyncssh.SSHKey],
    new: Config,
    new_keys: dict[Path, asyncssh.SSHKey],
    source: str,
) -> ReloadPlan:
    refused = [
        f"daemon.{key}: cannot change while vmfenced runs "
        f"({getattr(old.daemon, key)} -> {getattr(new.daemon, key)}); restart it instead"
        for key in FIXED
        if getattr(old.daemon, key) != getattr(new.daemon, key)
    ]
    if refused:
        raise ConfigError(source, refused)
    old_hosts = {h.name: h for h in old.hosts}
    new_hosts = {h.name: h for h in new.hosts}
    added, replaced, unchanged = [], [], []
    for name, host in new_hosts.items():
        before = old_hosts.get(name)
        if before is None:
            added.append(name)
        elif (
            _identity(before) != _identity(host)
            or old.ssh_for(before) != new.ssh_for(host)
            or _key_material(old, before.name, old_keys) != _key_material(new, name, new_keys)
        ):
            replaced.append(name)
        else:
            unchanged.append(name)
    removed = [name for name in old_hosts if name not in new_hosts]
    settings = [
        f"daemon.{key}"
        for key in type(new.daemon).model_fields
        if key not in FIXED and getattr(old.daemon, key) != getattr(new.daemon, key)
    ]
    if old.aliases != new.aliases:
        settings.append("aliases")
    if old.metrics != new.metrics:
        settings.append("metrics.listen")
    return ReloadPlan(
        config=new,
        keys=new_keys,
        added=tuple(added),
        removed=tuple(removed),
        replaced=tuple(replaced),
        unchanged=tuple(unchanged),
        settings=tuple(settings),
    )


def _identity(host: HostConfig) -> dict[str, object]:
    # Per-host SSH overrides count through ssh_for(): an override equal to the default is no change.
    return host.model_dump(exclude=set(SSHConfig.model_fields))


def _key_material(config: Config, host: str, keys: dict[Path, asyncssh.SSHKey]) -> list[bytes]:
    # A key file rewritten in place (same path, new key) must reach the host's next login.
    if config.host(host).kind == "vsphere":
        # Its password file's path is in the entry; the session reads the file at every
        # login, so a new password in the same file needs no new session.
        return []
    return [keys[path].public_data for path in config.ssh_for(config.host(host)).client_keys]
