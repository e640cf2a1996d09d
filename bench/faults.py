"""The fault generator, long run: `python3 bench/faults.py [--seed S] [--ops N] [--quick]
[--no-libvirt] [--doc FILE]`.

A seeded random schedule (`vmflab.chaos`) against a real daemon on the real-sshd lab: ESXi hosts
esx1-esx3 and libvirt hosts kvm1-kvm2 in the daemon's config, esx4 and kvm3 outside it (VMs
migrate there too). Every reply is checked against the hosts' real process tables
(`vmflab.oracle`): false successes, false OFF answers and collateral kills must all be 0. Prints
the summary and writes it, with the seed and the command, to its own section of FILE (default
docs/faults.md; `--quick` writes nothing unless `--doc` is given). Exit status 0 either way: the
figures are the result (tests/faults/test_generator.py asserts them on a short run).
About 15 minutes for 2,000 operations on 2 cores.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from vmflab import Lab
from vmflab.chaos import Chaos, Settings
from vmflab.chaos_report import DESCRIPTION, TITLE, render, write_section

ROOT = Path(__file__).resolve().parent.parent
ESXI_CONFIGURED = ("esx1", "esx2", "esx3")
ESXI_OUTSIDE = ("esx4",)
KVM_CONFIGURED = ("kvm1", "kvm2")
KVM_OUTSIDE = ("kvm3",)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="40 operations, ESXi hosts only")
    parser.add_argument("--no-libvirt", action="store_true", help="ESXi hosts only")
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    parser.add_argument("--doc", type=Path, help="file whose generator section is rewritten")
    args = parser.parse_args()
    ops = 40 if args.quick else args.ops
    libvirt = not (args.quick or args.no_libvirt)
    doc = args.doc if args.doc or args.quick else ROOT / "docs" / "faults.md"
    kvm = (*KVM_CONFIGURED, *KVM_OUTSIDE) if libvirt else ()
    configured = [*ESXI_CONFIGURED, *(KVM_CONFIGURED if libvirt else ())]
    outside = [*ESXI_OUTSIDE, *(KVM_OUTSIDE if libvirt else ())]
    settings = Settings(seed=args.seed, ops=ops, max_seconds=args.max_seconds)
    esxi = (*ESXI_CONFIGURED, *ESXI_OUTSIDE)
    with (
        tempfile.TemporaryDirectory(prefix="vmf-faults-") as tmp,
        Lab(Path(tmp), esxi, libvirt_hosts=kvm) as lab,
    ):
        chaos = Chaos(lab, configured, settings)
        tally = chaos.run()
    command = shlex.join(["python3", "bench/faults.py", *sys.argv[1:]])
    hosts = f"{', '.join(configured)} in the daemon's config; {', '.join(outside)} outside it"
    text = render(
        tally,
        seed=args.seed,
        seconds=chaos.seconds,
        hosts=hosts,
        command=command,
        revision=revision(),
    )
    print(text)
    if doc is not None:
        write_section(doc, f"{TITLE}\n\n{DESCRIPTION}\n{text}")
    return 0


def revision() -> str:
    """The commit the daemon ran from (the figures change with it), "" outside a git tree."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else ""


if __name__ == "__main__":
    sys.exit(main())
