"""The wheel and sdist: built offline from a copy of the tree, installed in fresh venvs, the
entry points run; the agent works through a /usr/sbin-style symlink, as Pacemaker finds it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from vmfenced import __version__

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ["pyproject.toml", "README.md", "CHANGELOG.md", "MANIFEST.in"]
TREES = ["vmfenced", "vmflab", "systemd", "config", "docs"]


def run(*argv: str | Path, cwd: Path | None = None) -> str:
    # A PYTHONPATH (a work tree's) would shadow the wheel installed in the test's venv.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=cwd,
        env=env,
    )
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build")
    pytest.importorskip("wheel")
    src = tmp_path_factory.mktemp("src")
    for name in SHIPPED:
        shutil.copy2(REPO / name, src / name)
    for name in TREES:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    # Offline: the build backend installed here (CI's setup installs build and wheel).
    run(
        sys.executable,
        *("-m", "build", "--no-isolation", "--skip-dependency-check"),
        *("--outdir", out, src),
    )
    return out


def test_wheel_and_sdist_contents(dist: Path) -> None:
    (wheel,) = dist.glob("vmfenced-*.whl")
    (sdist,) = dist.glob("vmfenced-*.tar.gz")
    assert wheel.name == f"vmfenced-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"vmfenced-{__version__}.dist-info/entry_points.txt").decode()
    assert {
        "vmfenced/py.typed",
        "vmfenced/daemon/app.py",
        "vmfenced/clients/agent.py",
        "vmfenced/backends/esxi.py",
        "vmfenced/wire.py",
        # Wrappers written by earlier installs import the agent by its old name.
        "vmfenced/agent.py",
        # What `vmfencectl host-helper` prints.
        "vmfenced/hosthelper/esxi.sh",
        "vmfenced/hosthelper/esx-classic.sh",
        "vmfenced/hosthelper/libvirt.sh",
        "vmfenced/hosthelper/proxmox.sh",
    } <= names
    # The lab (namespaces, shims, a C program) is in the copied tree but never on a cluster node.
    assert not [n for n in names if n.startswith(("tests/", "vmflab/", "bench/"))], names
    for script in (
        "vmfenced = vmfenced.daemon.app:main",
        "fence_vmfenced = vmfenced.clients.agent:main",
        "vmfencectl = vmfenced.clients.ctl:main",
    ):
        assert script in entry_points
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1] for m in archive.getmembers() if "/" in m.name}
    assert {
        "CHANGELOG.md",
        "systemd/vmfenced.service",
        "config/vmfenced.toml",
        "docs/protocol.md",
    } <= members


def test_clients_install_alone_and_the_agent_runs_through_a_symlink(
    dist: Path, tmp_path: Path
) -> None:
    (wheel,) = dist.glob("vmfenced-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    # No dependencies at all: the agent and vmfencectl need the standard library only.
    run(venv / "bin" / "pip", "install", "--quiet", "--no-deps", "--no-index", wheel)
    assert run(venv / "bin" / "vmfencectl", "--version") == f"vmfencectl {__version__}\n"
    # The host helper is package data: printed without the daemon's dependencies.
    helper = run(venv / "bin" / "vmfencectl", "host-helper", "--kind", "esxi")
    assert helper == (Path(__file__).parents[2] / "vmfenced/hosthelper/esxi.sh").read_text()
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    (sbin / "fence_vmfenced").symlink_to(venv / "bin" / "fence_vmfenced")
    metadata = run(sbin / "fence_vmfenced", "-o", "metadata")
    assert '<resource-agent name="fence_vmfenced"' in metadata


def test_daemon_entry_point_in_a_venv(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("vmfenced-*.whl")
    venv = tmp_path / "venv"
    # The dependencies come from this machine's site-packages (no network in tests).
    run(sys.executable, "-m", "venv", "--system-site-packages", venv)
    run(venv / "bin" / "pip", "install", "--quiet", "--no-deps", "--no-index", wheel)
    # Not from the work tree: `python -c` looks in its working directory first.
    where = run(
        venv / "bin" / "python", "-c", "import vmfenced; print(vmfenced.__file__)", cwd=tmp_path
    )
    assert where.startswith(str(venv)), where  # the wheel's copy, not the work tree
    assert run(venv / "bin" / "vmfenced", "--version", cwd=tmp_path) == f"vmfenced {__version__}\n"
