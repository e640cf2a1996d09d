"""libvirt backend's shell scripts run for real (dash, with gawk and with mawk) against local
processes whose argv is a real qemu command line, or which no guard can judge (a zombie leader
whose thread still runs, an emptied argv area: vmflab.libvirt.UNJUDGEABLE); also esx-classic's
/proc scan, which shares procfs's helpers and the rule for those processes."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.test_libvirt import ODD_NAMES, UUID1, guest, qemu_argv
from vmfenced.backends import esx_classic as ec
from vmfenced.backends import libvirt as lv
from vmfenced.backends import parse_kill_marker
from vmfenced.errors import ParseError
from vmfenced.model import KillOutcome, RegisteredVM, RunningVM
from vmflab.libvirt import UNJUDGEABLE_KINDS, unjudgeable_argv

pytestmark = pytest.mark.integration

# A runner of a script under dash (the fixture run) and the processes a test started.
Run = Callable[..., subprocess.CompletedProcess[str]]


class Procs(list[subprocess.Popen[bytes]]):
    """The processes a test started; `qemu`: the Python that stands in for qemu, started through
    a link named like qemu's binary so that its comm is a qemu's (the guard checks it)."""

    def __init__(self, qemu: Path) -> None:
        super().__init__()
        self.qemu = qemu


AWKS = [a for a in ("gawk", "mawk") if shutil.which(a)]
needs_shell = pytest.mark.skipif(
    not (shutil.which("dash") and AWKS and Path("/proc/self/stat").exists()),
    reason="needs dash, an awk and /proc",
)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    qemu = tmp_path / "qemu-bin" / "qemu-system-x86_64"
    qemu.parent.mkdir()
    qemu.symlink_to(sys.executable)
    started = Procs(qemu)
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(params=AWKS)
def run(request: pytest.FixtureRequest, tmp_path: Path) -> Run:
    """Runs a script under dash with PATH's awk being gawk or mawk, like the lane's shell."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "awk").symlink_to(shutil.which(str(request.param)) or "")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LC_ALL": "C"}

    def runner(
        script: str, *, uri: str = "qemu:///system", prefix: list[str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*(prefix or []), "dash", "-c", script],
            env={**env, "LIBVIRT_DEFAULT_URI": uri},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    return runner


def start(procs: Procs, argv: list[str]) -> int:
    if argv[0] == sys.executable:  # qemu_argv's stand-in: run it under a qemu's comm
        argv = [str(procs.qemu), *argv[1:]]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    procs.append(proc)
    return proc.pid


def wait_cmdline(pid: int, timeout: float = 10) -> None:
    """Until the child has exec'd (its cmdline is the one we gave it), with a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"-name" in cmdline or cmdline.startswith(b"sleep"):
            return
        time.sleep(0.001)  # polling a condition with a deadline
    raise AssertionError(f"{pid} never exec'd")


def launched(procs: Procs, argv: list[str]) -> int:
    """A started process's PID, once it has exec'd argv."""
    pid = start(procs, argv)
    wait_cmdline(pid)
    return pid


def fake_virsh(tmp_path: Path, script: str) -> str:
    """Puts a virsh that runs script first on PATH: the prefix of a command that uses it."""
    virsh = tmp_path / "virsh"
    virsh.write_text(script)
    virsh.chmod(0o755)
    return f"PATH={tmp_path}:$PATH; "


def kernel_thread() -> int | None:
    """A kernel thread's PID (PF_KTHREAD in /proc/PID/stat's flags), if this /proc shows one."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                flags = int((entry / "stat").read_text().rpartition(") ")[2].split()[6])
            except (OSError, IndexError, ValueError):
                continue
            if flags & 0x00200000:
                return int(entry.name)
    return None


@needs_shell
def test_pidfile_listing_matches_names_exactly(run: Run, procs: Procs, tmp_path: Path) -> None:
    run_dir = tmp_path / "qemu"
    run_dir.mkdir()
    pids = {}
    files = {"vm1": "vm1", "vm10": "vm10", "vm1,x": "vm1,x", **ODD_NAMES}
    for name, file in files.items():
        pids[name] = launched(procs, qemu_argv(guest(name)))
        (run_dir / f"{file}.pid").write_text(str(pids[name]))  # no newline, like libvirt
    (run_dir / "driver.pid").write_text(str(os.getpid()))  # libvirtd's own: not a VM
    (run_dir / "vm1.xml").write_text("<domstatus/>")
    dead = start(procs, ["true"])
    procs[-1].wait()
    (run_dir / "stale.pid").write_text(str(dead))  # its qemu is gone
    sleeper = launched(procs, ["sleep", "600"])
    (run_dir / "reused.pid").write_text(str(sleeper))  # another program reused the PID
    kthread = kernel_thread()
    if kthread is not None:
        (run_dir / "kthread.pid").write_text(str(kthread))  # a kernel thread reused the PID
    result = run(lv.pidfile_listing(str(run_dir)))
    assert result.returncode == 0, result
    listed = lv.parse_vm_lines(result.stdout)
    assert {vm.name: vm.cartel for vm in listed} == pids
    assert all(vm.uuid == UUID1 for vm in listed)
    assert {vm.config_file for vm in listed} == {lv.pid_file(name) for name in files}


@needs_shell
@pytest.mark.parametrize(
    ("file", "argv_name", "reason"),
    [
        # The qemu of another domain under the PID: never "vm1 is not running".
        ("vm1", guest("vm10"), "a qemu -name guest=vm10"),
        ("x&amp;y", guest("x&amp;y"), "a qemu -name guest=x&amp;y"),  # x&y's file, not x&amp;y
        ("x&y", guest("x&y"), "pid file name not understood"),  # libvirt never writes a bare &
        ("a&#38;b", guest("a&b"), "pid file name not understood"),
    ],
)
def test_pidfile_listing_doubts_a_pid_file_naming_another_qemu(
    run: Run, procs: Procs, *, tmp_path: Path, file: str, argv_name: str, reason: str
) -> None:
    run_dir = tmp_path / "qemu"
    run_dir.mkdir()
    pid = launched(procs, qemu_argv(argv_name))
    (run_dir / f"{file}.pid").write_text(str(pid))
    result = run(lv.pidfile_listing(str(run_dir)))
    assert result.returncode == 3 and reason in result.stdout, result
    with pytest.raises(ParseError):
        lv.parse_vm_lines(result.stdout)


def unjudgeable(procs: Procs, kind: str, comm: str) -> int:
    """A local process the guards cannot judge (vmflab.libvirt.UNJUDGEABLE), once it is so."""
    pid = start(procs, unjudgeable_argv(kind, comm))
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        # The comm first: a command line also reads empty for a moment inside execve.
        head, _, rest = stat.read_text().rpartition(") ")
        fields = rest.split()
        empty = Path(f"/proc/{pid}/cmdline").read_bytes() == b""
        zombie = fields[0] == "Z" and int(fields[17]) > 1
        if head.endswith(f"({comm}") and empty and (zombie or kind == "empty-cmdline"):
            return pid
        assert procs[-1].poll() is None, f"{kind} helper exited {procs[-1].returncode}"
        time.sleep(0.005)  # polling a condition with a deadline
    raise AssertionError(f"{pid} never became {kind}")


def scan(run: Run, script: str, pid: int) -> str:
    """A whole-/proc scan's answer, until no other process's doubt hides ours: this machine runs
    other tests' labs, whose qemu and vmware-vmx processes also read empty while they exit."""
    deadline = time.monotonic() + 10
    while True:
        result = run(script)
        other = result.returncode == 3 and "cannot judge " in result.stdout
        if not other or f"cannot judge {pid} " in result.stdout or time.monotonic() > deadline:
            assert result.returncode in (0, 3), result
            return f"{result.returncode} {result.stdout}"
        time.sleep(0.01)  # polling a condition with a deadline


@needs_shell
@pytest.mark.parametrize("kind", UNJUDGEABLE_KINDS)
@pytest.mark.parametrize("comm", ["qemu-system-x86", "unrelated"])
def test_pidfile_listing_doubts_a_process_it_cannot_judge(
    run: Run, procs: Procs, tmp_path: Path, kind: str, comm: str
) -> None:
    """The pid file names the process: whatever its comm, it is never "not running"."""
    run_dir = tmp_path / "qemu"
    run_dir.mkdir()
    pid = unjudgeable(procs, kind, comm)
    (run_dir / "vm1.pid").write_text(str(pid))
    result = run(lv.pidfile_listing(str(run_dir)))
    assert result.returncode == 3 and "vmf:doubt " in result.stdout, result
    assert f"{pid} (vm1)" in result.stdout
    # The guard cannot judge it either: an error, never "not running".
    answer = run(lv.kill_command(RunningVM("vm1", "", pid), 1))
    assert "vmf:error" in answer.stdout, answer
    assert procs[-1].poll() is None


@needs_shell
def test_pidfile_listing_doubts(run: Run, tmp_path: Path) -> None:
    run_dir = tmp_path / "qemu"
    assert run(lv.pidfile_listing(str(run_dir))).returncode == 3  # no run dir: never "none"
    run_dir.mkdir()
    result = run(lv.pidfile_listing(str(run_dir)))
    assert (result.returncode, result.stdout) == (0, "vmf:end\n")
    (run_dir / "vm1.pid").write_text("")  # being written: cannot tell
    assert run(lv.pidfile_listing(str(run_dir))).returncode == 3
    # /proc/0123 does not exist: a leading zero would read a running VM as gone.
    (run_dir / "vm1.pid").write_text("0123")
    result = run(lv.pidfile_listing(str(run_dir)))
    assert (result.returncode, result.stdout) == (3, f"vmf:doubt bad pid file {run_dir}/vm1.pid\n")
    (run_dir / "vm1.pid").write_text("84")
    # Another libvirtd than the system one: its pid files are elsewhere.
    assert run(lv.pidfile_listing(str(run_dir)), uri="qemu:///session").returncode == 3


@needs_shell
def test_virsh_listing_matches_processes(run: Run, procs: Procs, tmp_path: Path) -> None:
    pids = {name: launched(procs, qemu_argv(guest(name))) for name in ("vm1", "vm1,x", "my vm 2")}
    # No vm10 process on purpose: virsh must not be fooled into it by the prefix.
    path = fake_virsh(tmp_path, "#!/bin/sh\nprintf 'vm1\\nvm1,x\\nmy vm 2\\n\\n'\n")
    script = path + lv.virsh_listing()
    result = run(script)
    assert result.returncode == 0, result
    assert {vm.name: vm.cartel for vm in lv.parse_vm_lines(result.stdout)} == pids
    fake_virsh(tmp_path, "#!/bin/sh\nprintf 'vm1\\nvm10\\n\\n'\n")  # vm10 "running", no process
    assert run(script).returncode == 3
    fake_virsh(tmp_path, "#!/bin/sh\necho 'error: failed to connect' >&2; exit 1\n")
    result = run(script)
    assert result.returncode == 3 and "failed to connect" in result.stdout


@needs_shell
def test_virsh_listing_reads_odd_names_as_virsh_prints_them(
    run: Run, procs: Procs, tmp_path: Path
) -> None:
    pids = {name: launched(procs, qemu_argv(guest(name))) for name in ODD_NAMES}
    (tmp_path / "names").write_text("".join(f"{name}\n" for name in pids) + "\n")
    path = fake_virsh(tmp_path, f"#!/bin/sh\ncat {tmp_path}/names\n")
    result = run(path + lv.virsh_listing())
    assert result.returncode == 0, result
    assert {vm.name: vm.cartel for vm in lv.parse_vm_lines(result.stdout)} == pids


@needs_shell
@pytest.mark.parametrize("kind", UNJUDGEABLE_KINDS)
@pytest.mark.parametrize(
    ("comm", "doubt"), [("qemu-system-x86", True), ("qemu-kvm", True), ("kvm", True), ("sh", False)]
)
def test_virsh_listing_doubts_a_qemu_it_cannot_judge(
    run: Run, procs: Procs, *, tmp_path: Path, kind: str, comm: str, doubt: bool
) -> None:
    """Whatever virsh says runs: a live qemu whose command line reads empty could be any VM."""
    pid = unjudgeable(procs, kind, comm)
    path = fake_virsh(tmp_path, "#!/bin/sh\necho\n")  # libvirtd: nothing runs
    answer = scan(run, path + lv.virsh_listing(), pid)
    if doubt:
        assert answer.startswith("3 ") and f"cannot judge {pid} ({comm}" in answer, answer
    else:
        # Any process reads empty while it exits: only one that could be a qemu is a doubt.
        assert answer == "0 vmf:end\n", answer


@needs_shell
@pytest.mark.parametrize("kind", UNJUDGEABLE_KINDS)
@pytest.mark.parametrize(("comm", "doubt"), [("vmware-vmx", True), ("sh", False)])
def test_esx_classic_scan_doubts_a_vmx_it_cannot_judge(
    run: Run, procs: Procs, kind: str, comm: str, doubt: bool
) -> None:
    """esx-classic's /proc scan shares the rule (and procfs's helpers) with libvirt's."""
    pid = unjudgeable(procs, kind, comm)
    answer = scan(run, ec.proc_listing(), pid)
    if doubt:
        assert answer.startswith("3 ") and f"cannot judge {pid} ({comm}" in answer, answer
    else:
        assert answer.startswith("0 "), answer
        # Other tests' labs may run vmware-vmx processes on this machine: only ours matters.
        assert pid not in {vm.cartel for vm in ec.parse_proc_listing(answer[2:])}


def kill(
    run: Run,
    name: str,
    pid: int,
    prefix: list[str] | None = None,
) -> KillOutcome:
    result = run(lv.kill_command(RunningVM(name, "", pid), 5), prefix=prefix)
    assert result.returncode == 0, result
    return parse_kill_marker(result.stdout)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2][:1]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@needs_shell
@pytest.mark.parametrize(
    ("target", "running", "argv_name"),
    [
        ("vm1", "vm10", guest("vm10")),  # a prefix of another domain
        ("vm10", "vm1", guest("vm1")),
        ("vm1", "vm1,x", guest("vm1,x")),  # escaped comma: vm1,,x
        ("vm1,x", "vm1", guest("vm1") + ",,x"),  # not a real libvirt form, but never vm1,x
        ("vm1", "", ""),  # no -name at all (another program reused the PID)
    ],
)
def test_guard_never_kills_another_domain(
    run: Run, procs: Procs, target: str, running: str, argv_name: str
) -> None:
    pid = launched(procs, qemu_argv(argv_name) if running else ["sleep", "600"])
    assert kill(run, target, pid) is KillOutcome.NOT_THAT_VM
    assert alive(pid)


@needs_shell
def test_guard_never_kills_a_program_that_is_no_qemu(
    run: Run, procs: Procs, tmp_path: Path
) -> None:
    """`-name vm1` on another program's command line (an Erlang node, `find`): not that VM,
    whoever chose the PID (through the host helper, the requesting node does)."""
    beam = tmp_path / "beam.smp"
    beam.symlink_to(sys.executable)
    pid = launched(procs, [str(beam), *qemu_argv(guest("vm1"))[1:]])
    assert kill(run, "vm1", pid) is KillOutcome.NOT_THAT_VM
    assert alive(pid)


@needs_shell
@pytest.mark.parametrize(
    ("name", "argv_name"),
    [
        ("vm1", guest("vm1")),
        ("vm1,x", guest("vm1,x")),
        ('it\'s "a" $vm `x`', guest('it\'s "a" $vm `x`')),
        *((name, guest(name)) for name in ODD_NAMES),
        ("vm1", "guest=vm1"),
        ("vm1", "vm1"),  # qemu's implied key, as older libvirt passed it
    ],
)
def test_guard_kills_its_domain_and_confirms(
    run: Run, procs: Procs, name: str, argv_name: str
) -> None:
    pid = launched(procs, qemu_argv(argv_name))
    # Not reaped by us until after: the script must count the zombie as dead.
    assert kill(run, name, pid) is KillOutcome.KILLED
    assert not alive(pid)
    procs[-1].wait()
    assert kill(run, name, pid) is KillOutcome.NOT_RUNNING


@needs_shell
def test_guard_refused_kill_is_an_error_not_a_verdict(run: Run, procs: Procs) -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the script as another user")
    pid = launched(procs, qemu_argv(guest("vm1")))
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    result = run(lv.kill_command(RunningVM("vm1", "", pid), 5), prefix=nobody)
    assert "vmf:error" in result.stdout and "refused" in result.stdout
    with pytest.raises(ParseError):
        parse_kill_marker(result.stdout)
    assert alive(pid)


@needs_shell
@pytest.mark.parametrize("name", ["vm1", "a&b'c\"d<e>f $x `y`"])
def test_power_on_waits_until_libvirtd_saw_the_old_qemu_die(
    run: Run, tmp_path: Path, name: str
) -> None:
    # domstate answers "running" twice (libvirtd lags a kill -9), then "shut off (crashed)".
    (tmp_path / "name").write_text(name)
    path = fake_virsh(
        tmp_path,
        f"""#!/bin/sh
echo "$*" >> {tmp_path}/calls
n=$(wc -l < {tmp_path}/calls)
case $1 in
  domstate) if [ "$n" -le 2 ]; then echo running; else echo 'shut off'; fi; echo;;
  domname) cat {tmp_path}/name; printf '\\n\\n';;
  start) echo "Domain '$3' started";;
esac
""",
    )
    result = run(path + lv.power_on_command(RegisteredVM(UUID1, name, "")))
    assert result.returncode == 0, result
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [f"domstate --domain {UUID1}"] * 3 + [
        f"domname --domain {UUID1}",
        f"start --domain {UUID1}",
    ]


@needs_shell
@pytest.mark.parametrize(
    ("answer", "status"),
    [("vm2", 0), ("vm1 ", 0), ("vm10", 0), ("VM1", 0), ("error: failed to get domain", 1)],
)
def test_power_on_refuses_a_uuid_that_names_another_domain(
    run: Run, tmp_path: Path, answer: str, status: int
) -> None:
    """The domain was undefined and its UUID reused since the inventory: never started."""
    path = fake_virsh(
        tmp_path,
        f"""#!/bin/sh
echo "$*" >> {tmp_path}/calls
case $1 in
  domstate) echo 'shut off';;
  domname) echo {shlex.quote(answer)}; exit {status};;
  start) echo started;;
esac
""",
    )
    result = run(path + lv.power_on_command(RegisteredVM(UUID1, "vm1", "")))
    assert result.returncode == 1 and result.stdout.startswith("vmf:refused"), result
    assert answer in result.stdout
    assert "start" not in (tmp_path / "calls").read_text()


@needs_shell
def test_power_on_by_name_from_an_older_virsh_has_nothing_to_recheck(
    run: Run, tmp_path: Path
) -> None:
    path = fake_virsh(tmp_path, f"#!/bin/sh\necho \"$*\" >> {tmp_path}/calls\necho 'shut off'\n")
    result = run(path + lv.power_on_command(RegisteredVM("vm1", "vm1", "")))
    assert result.returncode == 0, result
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["domstate --domain vm1", "start --domain vm1"]
