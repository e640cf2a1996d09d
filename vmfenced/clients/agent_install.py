"""`python3 -m vmfenced.clients.agent_install [PATH]`: write the fence agent Pacemaker runs.

Pacemaker starts the agent as a new process for every fence, status and monitor, so its
start-up is on the fencing path. A console script starts the interpreter with `site`, which
walks site-packages and runs every `.pth` file there (tens of milliseconds on a busy Python),
although the agent needs nothing but the standard library and its own package. The wrapper
written here runs the same interpreter isolated and without `site` (`-I -S`) and puts only
this package's directory on the path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_TARGET = Path("/usr/sbin/fence_vmfenced")


def wrapper_text(python: str, package_parent: str) -> str:
    return (
        f"#!{python} -IS\n"  # one argument: a shebang passes the rest of the line as one
        "# fence_vmfenced, written by `python3 -m vmfenced.clients.agent_install`:\n"
        "# the interpreter runs without site (-S) and isolated (-I); only vmfenced's\n"
        "# own directory is on the path.\n"
        "import sys\n"
        f"sys.path.insert(0, {package_parent!r})\n"
        "from vmfenced.clients.agent import main\n"
        "main()\n"
    )


def install(target: Path, python: str = sys.executable) -> Path:
    import vmfenced

    parent = str(Path(vmfenced.__file__).resolve().parent.parent)
    temporary = target.with_name(f".{target.name}.tmp{os.getpid()}")
    temporary.write_text(wrapper_text(python, parent))
    temporary.chmod(0o755)
    temporary.replace(target)  # atomic: a fence running now keeps the old file
    return target


def main() -> None:
    args = sys.argv[1:]
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(
            "usage: python3 -m vmfenced.clients.agent_install [PATH]"
            "  (default /usr/sbin/fence_vmfenced)"
        )
        sys.exit(2)
    target = Path(args[0]) if args else DEFAULT_TARGET
    try:
        print(install(target))
    except OSError as exc:
        print(f"cannot write {target}: {exc.strerror}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
