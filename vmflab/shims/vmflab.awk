# awk program of the lab's ESXi command shims (see vmflab-lib.sh); "mode" selects the output.
#
# From "ps -e -o pid=,stat=,comm=,args=" on stdin (variable "run": the run directory):
#   vmdumper     vmdumper -l
#   ps, psc      busybox ps / ps -c (worlds: WID CID World Name [Command])
#   esxcli       esxcli vm process list
#   esxcli-xml   esxcli --formatter=xml vm process list
#   vms          cartel, world, uuid, display name, .vmx (tab-separated; the name as the
#                .vmx writes it, |XX-escaped, so it holds no tab or newline)
# A VM is a non-zombie process named vmx whose command line is "/bin/vmx ... /vmfs/...vmx"; its
# world ID and identity come from its run file (written before it took that command line),
# else from its .vmx (world ID = cartel + 1). Display names stay |XX-escaped (as in the .vmx)
# until printed: vmdumper, esxcli and getallvms print them decoded, whatever they hold (the
# lab's hostile names); ps shows "?" for a control character, as busybox ps does.
#
# Other modes:
#   vmxinfo      uuid and display name of the .vmx in ENVIRON["cfg"] (reads no input)
#   registry     stdin: existing .vmx paths; variables "registry" (the Vmid file) and "out"
#                (its next version); prints "vmid<TAB>path" for each existing .vmx, giving new
#                ones the next Vmid, and writes every known entry to "out"
#   getallvms    stdin: the registry output; prints vim-cmd vmsvc/getallvms rows

function vmx_value(line,   v) {
    v = line
    sub(/^[^=]*=[ \t]*"/, "", v)
    sub(/"[ \t]*$/, "", v)
    return v
}

# Sets vmx_name, vmx_uuid, vmx_guest, vmx_version and vmx_annotation; false if unreadable.
function vmx_read(path,   line, n) {
    vmx_name = ""; vmx_uuid = ""; vmx_guest = ""; vmx_version = ""; vmx_annotation = ""
    n = 0
    while ((getline line < path) > 0) {
        n++
        if (line ~ /^[ \t]*displayName[ \t]*=/) vmx_name = vmx_value(line)
        else if (line ~ /^[ \t]*uuid\.bios[ \t]*=/) vmx_uuid = vmx_value(line)
        else if (line ~ /^[ \t]*guestOS[ \t]*=/) vmx_guest = vmx_value(line)
        else if (line ~ /^[ \t]*virtualHW\.version[ \t]*=/) vmx_version = vmx_value(line)
        else if (line ~ /^[ \t]*annotation[ \t]*=/) vmx_annotation = vmx_value(line)
    }
    close(path)
    return n > 0
}

# The .vmx value encoding: |XX is the byte of hex XX (VMware writes |22 for a quote, |7C for
# "|", |0A for a newline...).
function vmx_decode(s,   out, i, h) {
    out = ""
    while ((i = index(s, "|")) > 0) {
        h = toupper(substr(s, i + 1, 2))
        if (h ~ /^[0-9A-F][0-9A-F]$/ && h != "00") {
            out = out substr(s, 1, i - 1) sprintf("%c", hex_digit(substr(h, 1, 1)) * 16 + hex_digit(substr(h, 2, 1)))
            s = substr(s, i + 3)
        } else {
            out = out substr(s, 1, i)
            s = substr(s, i + 1)
        }
    }
    return out s
}

function hex_digit(c) { return index("0123456789ABCDEF", c) - 1 }

# A world name as busybox ps shows it: control characters as "?".
function ps_name(s) {
    s = vmx_decode(s)
    gsub(/[\001-\037\177]/, "?", s)
    return s
}

function basename_vmx(path,   b) {
    b = path
    sub(/^.*\//, "", b)
    sub(/\.vmx$/, "", b)
    return b
}

function xml(s) {
    gsub(/&/, "\\&amp;", s)
    gsub(/</, "\\&lt;", s)
    gsub(/>/, "\\&gt;", s)
    gsub(/"/, "\\&quot;", s)
    return s
}

function field(name, type, value) {
    printf "         <field name=\"%s\">\n            <%s>%s</%s>\n         </field>\n", name, type, value, type
}

function world_line(wid, cid, name, args) {
    if (mode == "psc") printf "%-10s %-10s %-36s %s\n", wid, cid, name, args
    else printf "%-10s %-10s %s\n", wid, cid, name
}

BEGIN {
    FS = " "
    if (mode == "vmxinfo") {
        cfg = ENVIRON["cfg"]
        vmx_read(cfg)
        if (vmx_name == "") vmx_name = basename_vmx(cfg)
        printf "%s\t%s\n", vmx_uuid, vmx_name
        exit
    } else if (mode == "registry") {
        FS = "\t"
        while ((getline line < registry) > 0) {
            split(line, a, "\t")
            if (a[1] !~ /^[0-9]+$/ || a[2] == "" || (a[2] in id)) continue
            n++
            path[n] = a[2]
            id[a[2]] = a[1]
            if (a[1] + 0 > max) max = a[1] + 0
        }
        close(registry)
    } else if (mode == "getallvms") {
        FS = "\t"
    } else if (mode == "psc") {
        printf "%-10s %-10s %-36s %s\n", "WID", "CID", "World Name", "Command"
    } else if (mode == "ps") {
        printf "%-10s %-10s %s\n", "WID", "CID", "World Name"
    } else if (mode == "esxcli-xml") {
        print "<?xml version=\"1.0\" encoding=\"utf-8\"?>"
        print "<output xmlns=\"http://www.vmware.com/Products/ESX/5.0/esxcli\">"
        print "<root>"
        print "   <list type=\"structure\">"
    }
}

mode == "registry" {
    exists[$0] = 1
    if (!($0 in id)) {
        n++
        path[n] = $0
        id[$0] = ++max
    }
    next
}

mode == "getallvms" {
    vmx_read($2)
    if (vmx_name == "") vmx_name = basename_vmx($2)
    file = $2
    sub(/^\/vmfs\/volumes\//, "", file)
    ds = file
    sub(/\/.*$/, "", ds)
    sub(/^[^\/]*\//, "", file)
    guest = vmx_guest
    if (guest == "otherlinux-64") guest = "otherLinux64Guest"
    else if (guest == "other") guest = "otherGuest"
    version = vmx_version == "" ? "" : "vmx-" vmx_version
    printf "%-6s %-30s %-44s %-20s %-8s %s\n", $1, vmx_decode(vmx_name), "[" ds "] " file, guest, version, vmx_decode(vmx_annotation)
    next
}

{
    pid = $1; st = $2; comm = $3
    if (st ~ /^Z/ || pid !~ /^[0-9]+$/) next
    args = $0
    sub(/^[ \t]*[0-9]+[ \t]+[^ \t]+[ \t]+[^ \t]+[ \t]+/, "", args)
    cfg = ""
    if (comm == "vmx" && index(args, "/bin/vmx ") == 1 && args ~ /\.vmx$/) {
        p = index(args, " /vmfs/")
        if (p > 0) cfg = substr(args, p + 1)
    }
    if (cfg == "") {
        if (mode == "psc" || mode == "ps") world_line(pid, pid, comm, args)
        next
    }
    world = pid + 1; uuid = ""; name = ""
    f = run "/vm." pid
    if ((getline rec < f) > 0) {
        split(rec, a, "\t")
        if (a[4] == cfg && a[1] ~ /^[0-9]+$/) { world = a[1]; uuid = a[2]; name = a[3] }
    }
    close(f)
    if (name == "" && vmx_read(cfg)) { name = vmx_name; uuid = vmx_uuid }
    if (name == "") name = basename_vmx(cfg)
    if (mode == "vmdumper") {
        printf "vmid=%s pid=-1 cfgFile=\"%s\" uuid=\"%s\" displayName=\"%s\" vmxCartelID=%s\n", world, cfg, uuid, vmx_decode(name), pid
    } else if (mode == "psc" || mode == "ps") {
        world_line(pid, pid, "vmx", args)
        world_line(world + 1, pid, "vmx-vthread-1", args)
        world_line(world + 2, pid, "vmx-vthread-2", args)
        world_line(world, pid, "vmx-vcpu-0:" ps_name(name), args)
    } else if (mode == "esxcli") {
        print vmx_decode(name)
        print "   World ID: " world
        print "   Process ID: 0"
        print "   VMX Cartel ID: " pid
        print "   UUID: " uuid
        print "   Display Name: " vmx_decode(name)
        print "   Config File: " cfg
        print ""
    } else if (mode == "esxcli-xml") {
        print "      <structure typeName=\"VirtualMachine\">"
        field("ConfigFile", "string", xml(cfg))
        field("DisplayName", "string", xml(vmx_decode(name)))
        field("ProcessID", "integer", 0)
        field("UUID", "string", xml(uuid))
        field("VMXCartelID", "integer", pid)
        field("WorldID", "integer", world)
        print "      </structure>"
    } else if (mode == "vms") {
        printf "%s\t%s\t%s\t%s\t%s\n", pid, world, uuid, name, cfg
    }
}

END {
    if (mode == "esxcli-xml") {
        print "   </list>"
        print "</root>"
        print "</output>"
    } else if (mode == "registry") {
        for (i = 1; i <= n; i++) {
            printf "%s\t%s\n", id[path[i]], path[i] > out
            if (path[i] in exists) printf "%s\t%s\n", id[path[i]], path[i]
        }
        close(out)
    }
}
