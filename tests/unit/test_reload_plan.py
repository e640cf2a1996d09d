"""What a reload changes: hosts added, removed, replaced, kept; keys refused; new config keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncssh
import pytest

from vmfenced.config import Config, parse
from vmfenced.daemon.reload_plan import plan, prepare
from vmfenced.errors import ConfigError

KEY = Path("/etc/vmfenced/id_ed25519")
OTHER = Path("/etc/vmfenced/other")


def config(**changes: Any) -> Config:
    data: dict[str, Any] = {
        "ssh": {"client_keys": [str(KEY)]},
        "hosts": [
            {"name": "esx1", "address": "192.0.2.11"},
            {"name": "esx2", "address": "192.0.2.12"},
            {"name": "esx3", "address": "192.0.2.13"},
        ],
        "aliases": {"node1": "gfs-node1"},
    }
    for key, value in changes.items():
        data[key] = value
    return parse(data)


@pytest.fixture(scope="module")
def keys() -> dict[Path, asyncssh.SSHKey]:
    return {
        KEY: asyncssh.generate_private_key("ssh-ed25519"),
        OTHER: asyncssh.generate_private_key("ssh-ed25519"),
    }


def test_same_config_changes_nothing(keys: dict[Path, asyncssh.SSHKey]) -> None:
    result = plan(config(), keys, config(), keys, "f")
    assert not result.changed
    assert result.unchanged == ("esx1", "esx2", "esx3")
    assert result.summary() == {
        "changed": False,
        "added": [],
        "removed": [],
        "replaced": [],
        "unchanged": ["esx1", "esx2", "esx3"],
        "settings": [],
    }


def test_hosts_added_removed_replaced(keys: dict[Path, asyncssh.SSHKey]) -> None:
    new = config(
        hosts=[
            {"name": "esx1", "address": "192.0.2.11"},
            {"name": "esx2", "address": "192.0.2.12", "port": 2222},
            {"name": "esx4", "address": "192.0.2.14"},
        ]
    )
    result = plan(config(), keys, new, keys, "f")
    assert (result.added, result.removed, result.replaced, result.unchanged) == (
        ("esx4",),
        ("esx3",),
        ("esx2",),
        ("esx1",),
    )


def test_an_ssh_default_replaces_every_host_it_reaches(keys: dict[Path, asyncssh.SSHKey]) -> None:
    new = config(
        ssh={"client_keys": [str(KEY)], "keepalive_interval": 2},
        hosts=[
            {"name": "esx1", "address": "192.0.2.11"},
            {"name": "esx2", "address": "192.0.2.12"},
            {"name": "esx3", "address": "192.0.2.13", "keepalive_interval": 0.5},
        ],
    )
    result = plan(config(), keys, new, keys, "f")
    # esx3 overrides the key back to its old effective value: its links stay.
    assert (result.replaced, result.unchanged) == (("esx1", "esx2"), ("esx3",))


def test_a_key_file_rewritten_in_place_replaces_its_hosts(
    keys: dict[Path, asyncssh.SSHKey],
) -> None:
    rotated = {KEY: keys[OTHER], OTHER: keys[OTHER]}
    result = plan(config(), keys, config(), rotated, "f")
    assert result.replaced == ("esx1", "esx2", "esx3")


def test_settings_and_aliases(keys: dict[Path, asyncssh.SSHKey]) -> None:
    new = config(
        daemon={"fence_timeout": 3, "journal_keep": 2},
        aliases={"node1": "gfs-node1", "node2": "gfs-node2"},
        metrics={"listen": "127.0.0.1:9105"},
    )
    result = plan(config(), keys, new, keys, "f")
    assert result.settings == (
        "daemon.fence_timeout",
        "daemon.journal_keep",
        "aliases",
        "metrics.listen",
    )
    assert result.unchanged == ("esx1", "esx2", "esx3")


def test_socket_and_state_directory_cannot_change_live(
    keys: dict[Path, asyncssh.SSHKey],
) -> None:
    new = config(daemon={"socket": "/run/other.sock", "state_directory": "/srv/vmfenced"})
    with pytest.raises(ConfigError) as info:
        plan(config(), keys, new, keys, "/etc/vmfenced/vmfenced.toml")
    assert info.value.problems == (
        "daemon.socket: cannot change while vmfenced runs "
        "(/run/vmfenced/vmfenced.sock -> /run/other.sock); restart it instead",
        "daemon.state_directory: cannot change while vmfenced runs "
        "(/var/lib/vmfenced -> /srv/vmfenced); restart it instead",
    )


def test_prepare_reports_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "vmfenced.toml"
    path.write_text(
        f"""
[daemon]
journal_max_bytes = 10
[ssh]
client_keys = ["{tmp_path}/missing"]
known_hosts = "{tmp_path}/known_hosts"
[[hosts]]
name = "esx1"
address = "192.0.2.11"
"""
    )
    with pytest.raises(ConfigError) as info:
        prepare(path)
    assert info.value.problems == (
        "daemon.journal_max_bytes: Input should be greater than or equal to 4096",
    )
    path.write_text(path.read_text().replace("journal_max_bytes = 10", ""))
    with pytest.raises(ConfigError) as info:
        prepare(path)
    assert info.value.problems == (
        f"client key of esx1: {tmp_path}/missing does not exist or is not a file",
        f"known_hosts of esx1: {tmp_path}/known_hosts does not exist or is not a file",
    )
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "missing").write_bytes(key.export_private_key())
    (tmp_path / "known_hosts").write_text("")
    loaded, loaded_keys = prepare(path)
    assert loaded.hosts[0].name == "esx1"
    assert loaded_keys[tmp_path / "missing"].public_data == key.public_data


@pytest.mark.parametrize(
    ("daemon", "problem"),
    [
        ({"journal_max_bytes": 1 << 31}, "daemon.journal_max_bytes: Input should be less than"),
        ({"journal_keep": 0}, "daemon.journal_keep: Input should be greater than or equal to 1"),
        ({"journal_keep": 101}, "daemon.journal_keep: Input should be less than or equal to 100"),
        ({"state_directory": "var/lib"}, "daemon.state_directory: must be an absolute path"),
    ],
)
def test_daemon_key_ranges_name_the_key(daemon: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(daemon=daemon)
    (line,) = info.value.problems
    assert line.startswith(problem)


@pytest.mark.parametrize(
    ("listen", "problem"),
    [
        ("localhost:9105", "'localhost' is not an IP address (names are not resolved)"),
        ("127.0.0.1", "must be ADDRESS:PORT like '127.0.0.1:9105', not '127.0.0.1'"),
        ("127.0.0.1:0", "port must be 1 to 65535, not '0'"),
        ("127.0.0.1:70000", "port must be 1 to 65535, not '70000'"),
        ("::1:9105", "write an IPv6 address in brackets, like '[::1]:9105', not '::1:9105'"),
    ],
)
def test_metrics_listen_is_checked(listen: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(metrics={"listen": listen})
    assert info.value.problems == (f"metrics.listen: {problem}",)


def test_metrics_defaults_off_and_endpoints_parse() -> None:
    assert config().metrics.endpoint() is None
    assert config(metrics={"listen": "127.0.0.1:9105"}).metrics.endpoint() == ("127.0.0.1", 9105)
    assert config(metrics={"listen": "[::1]:9105"}).metrics.endpoint() == ("::1", 9105)
    with pytest.raises(ConfigError) as info:
        config(metrics={"port": 1})
    assert info.value.problems == ("metrics.port: unknown key",)
