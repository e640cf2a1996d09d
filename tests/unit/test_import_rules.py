"""The wings' import rules (pyproject.toml, `[tool.importlinter]`) fail on a forbidden import.

CI runs `lint-imports` on the tree; these tests plant one forbidden import at a time in a copy
of the package and check that the contracts catch it, so a contract cannot quietly stop
meaning anything (an emptied module list, a renamed package).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = (
    "from importlinter.cli import lint_imports_command; import sys; "
    "sys.exit(lint_imports_command())"
)


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    # cwd first on the path: the copy is analysed, not the installed package.
    return subprocess.run(
        [sys.executable, "-c", LINT, "--no-cache", "--config", "pyproject.toml"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copytree(
        REPO / "vmfenced", tmp_path / "vmfenced", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_tree_keeps_every_contract(tree: Path) -> None:
    result = lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken", "edge"),
    [
        # The agent starts on every fence: a heavy dependency would slow every one.
        (
            "clients/replies.py",
            "import pydantic",
            "vmfenced.clients is not allowed to import pydantic",
            "vmfenced.clients.replies -> pydantic",
        ),
        (
            "clients/ctl.py",
            "import structlog",
            "vmfenced.clients is not allowed to import structlog",
            "vmfenced.clients.ctl -> structlog",
        ),
        (
            "clients/agent_options.py",
            "from vmfenced.daemon import verdict",
            "vmfenced.clients is not allowed to import vmfenced.daemon",
            "vmfenced.clients.agent_options -> vmfenced.daemon.verdict",
        ),
        # The daemon's pydantic models are not the clients' to use, even through a shared module.
        (
            "clients/client.py",
            "from vmfenced import protocol",
            "vmfenced.clients is not allowed to import vmfenced.protocol",
            "vmfenced.clients.client -> vmfenced.protocol",
        ),
        # The old module names, kept for installed wrappers, follow the clients' rule too.
        (
            "agent.py",
            "import asyncssh",
            "vmfenced.agent is not allowed to import asyncssh",
            "vmfenced.agent -> asyncssh",
        ),
        # (Through link this also reaches asyncssh, which the backends contract forbids too.)
        (
            "backends/esxi.py",
            "from vmfenced.daemon import link",
            "vmfenced.backends is not allowed to import vmfenced.daemon",
            "vmfenced.backends.esxi -> vmfenced.daemon.link",
        ),
        (
            "daemon/host.py",
            "from vmfenced.daemon import fence",
            "vmfenced.daemon.host is not allowed to import vmfenced.daemon.fence",
            "vmfenced.daemon.host -> vmfenced.daemon.fence",
        ),
        (
            "daemon/verdict.py",
            "import asyncio",
            "vmfenced.daemon.verdict is not allowed to import asyncio",
            "vmfenced.daemon.verdict -> asyncio",
        ),
        # Every daemon module takes a place in the layers.
        (
            "daemon/extra.py",
            '"""A module nobody placed."""',
            "not listed as layers",
            "- vmfenced.daemon.extra",
        ),
    ],
)
def test_a_forbidden_import_fails(
    tree: Path, module: str, line: str, broken: str, edge: str
) -> None:
    path = tree / "vmfenced" / module
    text = path.read_text() if path.exists() else ""
    path.write_text(f"{text}\n{line}\n")
    result = lint(tree)
    assert result.returncode == 1, result.stdout + result.stderr
    # The rule, and the planted import itself as the reason.
    assert broken in result.stdout, result.stdout
    assert edge in result.stdout, result.stdout
