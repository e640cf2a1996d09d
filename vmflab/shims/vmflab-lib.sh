# shellcheck shell=sh
# Shared code of the lab's ESXi command shims, sourced by each of them (POSIX sh + awk only:
# the commands they stand for are native on ESXi and must cost milliseconds here too).
# Layout inside a lab host (the host's directory is bind-mounted on /vmfs):
#   /vmfs/volumes/<datastore>/<vm>/<vm>.vmx   VM configs
#   /vmfs/.lab/bin                            these shims and the vmx binary (first in PATH)
#   /vmfs/.lab/run                            vm.<cartel> run files, the Vmid registry, temp files
#   /vmfs/.lab/ctl                            FIFO to the host's init (root): "nextpid N REPLYFIFO"

VMFLAB_ROOT=/vmfs/.lab
VMFLAB_BIN=$VMFLAB_ROOT/bin
VMFLAB_RUN=$VMFLAB_ROOT/run
VMFLAB_CTL=$VMFLAB_ROOT/ctl
VMFLAB_REGISTRY=$VMFLAB_RUN/vmids
VMFLAB_AWK=$VMFLAB_BIN/vmflab.awk

# vmflab_report MODE: the output of one command, built from the process table (see
# vmflab.awk). UTF-8 locale so that ps shows non-ASCII names instead of "?".
vmflab_report() {
    LC_ALL=C.UTF-8 /bin/ps -e -ww -o pid=,stat=,comm=,args= |
        awk -v mode="$1" -v run="$VMFLAB_RUN" -f "$VMFLAB_AWK"
}

# vmflab_is_uint VALUE: true for a non-empty string of digits.
vmflab_is_uint() {
    case $1 in
    '' | *[!0-9]*) return 1 ;;
    esac
    return 0
}

# vmflab_proc_state PID: prints the process state letter, nothing if there is no such process.
vmflab_proc_state() {
    vmflab_stat=
    if [ -r "/proc/$1/stat" ] && read -r vmflab_stat <"/proc/$1/stat" 2>/dev/null; then
        vmflab_stat=${vmflab_stat##*) }
        printf '%s\n' "${vmflab_stat%% *}"
    fi
}

# vmflab_alive PID: true if the process exists and is not a zombie.
vmflab_alive() {
    case $(vmflab_proc_state "$1") in
    '' | Z | X | x) return 1 ;;
    esac
    return 0
}

# vmflab_running_cartel CFG: prints the cartel ID of the running VM of CFG, if any.
vmflab_running_cartel() {
    vmflab_report vms | cfg="$1" awk -F '\t' '$5 == ENVIRON["cfg"] { print $1; exit }'
}

# vmflab_take_next_pid: if the lab left a PID in run/nextpid (LabHost.set_next_pid), claims it
# and has the host's init (root) set ns_last_pid so that this shell's next fork gets it. The
# caller must fork nothing else before that fork: the init removes the reply FIFO itself.
vmflab_take_next_pid() {
    [ -e "$VMFLAB_RUN/nextpid" ] || return 0
    vmflab_claim=$VMFLAB_RUN/claim.$$
    mv "$VMFLAB_RUN/nextpid" "$vmflab_claim.np" 2>/dev/null || return 0
    read -r vmflab_want <"$vmflab_claim.np"
    rm -f "$vmflab_claim.np" "$vmflab_claim.ack"
    mkfifo -m 600 "$vmflab_claim.ack" || return 1
    exec 3<>"$vmflab_claim.ack"
    printf 'nextpid %s %s\n' "$vmflab_want" "$vmflab_claim.ack" >"$VMFLAB_CTL"
    read -r vmflab_ack <&3
    exec 3<&-
    if [ "$vmflab_ack" != ok ]; then
        echo "vmflab: cannot give PID $vmflab_want to the next process: $vmflab_ack" >&2
        return 1
    fi
}

# vmflab_start CFG WORLD_OFFSET: powers on the VM of CFG detached from the session and prints
# its cartel ID once the process shows as "/bin/vmx ... CFG". A PID left by
# LabHost.set_next_pid goes to the VM: only shell builtins run between its claim and the fork.
vmflab_start() {
    vmflab_cfg=$1
    vmflab_off=$2
    if [ ! -f "$vmflab_cfg" ]; then
        echo "vmflab: no such VM config: $vmflab_cfg" >&2
        return 1
    fi
    vmflab_running=$(vmflab_running_cartel "$vmflab_cfg")
    if [ -n "$vmflab_running" ]; then
        echo "vmflab: $vmflab_cfg is already running (cartel $vmflab_running)" >&2
        return 2
    fi
    vmflab_info=$(cfg="$vmflab_cfg" awk -v mode=vmxinfo -f "$VMFLAB_AWK")
    vmflab_rdy=$VMFLAB_RUN/start.$$.rdy
    rm -f "$vmflab_rdy"
    mkfifo -m 600 "$vmflab_rdy" || return 1
    if ! vmflab_take_next_pid; then
        rm -f "$vmflab_rdy"
        return 1
    fi
    VMFLAB_RUNDIR=$VMFLAB_RUN VMFLAB_WORLD_OFFSET=$vmflab_off \
        VMFLAB_INFO="$vmflab_info	$vmflab_cfg" \
        "$VMFLAB_BIN/vmx" -s sched.group=host/vim/vmvisor "$vmflab_cfg" \
        </dev/null >"$vmflab_rdy" 2>/dev/null &
    vmflab_cartel=$!
    # Returns at EOF: the vmx closes its stdout once it shows its final command line.
    read -r vmflab_ready <"$vmflab_rdy" || :
    rm -f "$vmflab_rdy"
    if ! vmflab_alive "$vmflab_cartel"; then
        wait "$vmflab_cartel"
        echo "vmflab: the vmx of $vmflab_cfg exited at once (status $?)" >&2
        return 1
    fi
    printf '%s\n' "$vmflab_cartel"
}

# vmflab_kill_wait PID: waits (5 s at most) until PID is gone; the host's init reaps at once.
vmflab_kill_wait() {
    vmflab_i=0
    while vmflab_alive "$1"; do
        vmflab_i=$((vmflab_i + 1))
        if [ "$vmflab_i" -gt 1000 ]; then
            echo "vmflab: process $1 still alive" >&2
            return 1
        fi
        sleep 0.005
    done
}

# vmflab_registry: prints "vmid<TAB>cfg" for every registered VM (every .vmx under
# /vmfs/volumes/*/*/), giving new ones the next Vmid; Vmids are kept in the registry file so
# they stay stable.
vmflab_registry() {
    vmflab_lock=$VMFLAB_REGISTRY.lock
    vmflab_i=0
    until mkdir "$vmflab_lock" 2>/dev/null; do
        vmflab_i=$((vmflab_i + 1))
        if [ "$vmflab_i" -gt 300 ]; then
            # A holder killed mid-update leaves its lock behind.
            rmdir "$vmflab_lock" 2>/dev/null
            vmflab_i=0
        fi
        sleep 0.01
    done
    for vmflab_f in /vmfs/volumes/*/*/*.vmx; do
        [ -f "$vmflab_f" ] && printf '%s\n' "$vmflab_f"
    done | awk -v mode=registry -v registry="$VMFLAB_REGISTRY" \
        -v out="$VMFLAB_REGISTRY.tmp.$$" -f "$VMFLAB_AWK"
    mv -f "$VMFLAB_REGISTRY.tmp.$$" "$VMFLAB_REGISTRY" 2>/dev/null
    rmdir "$vmflab_lock"
}

# What a call through hostd costs: $1 seconds, plus what a test wrote in run/hostd-delay
# (a busy or hung hostd). Only the slow tools (esxcli, vim-cmd) pay it, as on ESXi.
vmflab_hostd() {
    sleep "$1"
    if [ -r /vmfs/.lab/run/hostd-delay ] && read -r vmflab_delay < /vmfs/.lab/run/hostd-delay; then
        sleep "$vmflab_delay"
    fi
}
