# Shared helpers for the guest workloads (busybox sh).  The line protocol, one marker per line:
#   @@FSI boot UPTIME k=v...                   @@FSI mounted UPTIME tag=TAG
#   @@FSI step-begin NAME UPTIME               @@FSI step-end NAME rc=RC UPTIME
#   @@FSI step-skip NAME REASON...             @@FSI check-fail STEP WHAT got=... want=...
#   @@FSI stat dev=D ino=I mode=HEX nlink=N size=S uid=U gid=G PATH
#   @@FSI mount LINE-FROM-/proc/mounts         @@FSI sum SHA256 PATH
#   @@FSI metric STEP KEY=VALUE...             @@FSI tick N UPTIME
#   @@FSI error TEXT...                        @@FSI result ok | fail failed=STEP,...
#   @@FSI unmounted PATH rc=RC                 @@FSI done UPTIME
# UPTIME is the first field of /proc/uptime (busybox date has no %N).

FAILED=""
STEP=""
MNT=/mnt

mark() { echo "@@FSI $*"; }

now() { read -r _up _idle </proc/uptime; echo "$_up"; }

# Centiseconds since boot into NOW_CS, for integer arithmetic (no subshell, so no fork).
read_cs() {
    read -r _up _idle </proc/uptime
    NOW_CS=${_up%.*}${_up#*.}
    while [ ${#NOW_CS} -gt 1 ] && [ "${NOW_CS#0}" != "$NOW_CS" ]; do NOW_CS=${NOW_CS#0}; done
}

# Kernel command line fsi_KEY=VALUE -> P_KEY (values are restricted to [A-Za-z0-9_.,:/+-] by the host).
fsi_params() {
    P_workload=smoke
    P_tag=myfs
    for a in $(cat /proc/cmdline); do
        case "$a" in
            fsi_*=*) k=${a%%=*}; export "P_${k#fsi_}=${a#*=}" ;;
        esac
    done
}

# param NAME DEFAULT: the value of fsi_NAME, or DEFAULT.
param() { eval "_v=\${P_$1:-}"; [ -n "$_v" ] && echo "$_v" || echo "$2"; }

# step NAME CMD...: time CMD with guest uptime; a non-zero status marks the run failed, the run goes on.
step() {
    STEP=$1
    shift
    mark step-begin "$STEP" "$(now)"
    "$@"
    _rc=$?
    mark step-end "$STEP" rc=$_rc "$(now)"
    [ $_rc -eq 0 ] || FAILED="$FAILED $STEP"
    return 0
}

skip() { mark step-skip "$@"; }

# expect WHAT GOT WANT: string equality with a check-fail marker (return 1) on mismatch.
expect() {
    [ "$2" = "$3" ] && return 0
    mark check-fail "$STEP" "$1" "got=$2" "want=$3"
    return 1
}

# must WHAT CMD...: run CMD, check-fail marker on a non-zero status.
must() {
    _what=$1
    shift
    "$@" && return 0
    mark check-fail "$STEP" "$_what" "rc=$?"
    return 1
}

stat_mark() {
    for _p in "$@"; do
        _o=$(stat -c 'dev=%d ino=%i mode=%f nlink=%h size=%s uid=%u gid=%g %n' "$_p") || {
            mark check-fail "$STEP" "stat $_p"; return 1; }
        mark stat "$_o"
    done
}

mounts_mark() {
    while read -r _l; do mark mount "$_l"; done </proc/mounts
}

# The share's submount paths (default: the fixture's sub and sub/inner), outermost first.
sub_paths() {
    echo "$MNT"
    for _s in $(param subs sub,sub/inner | tr ',' ' '); do echo "$MNT/$_s"; done
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# Unmount every virtiofs mount under /mnt, deepest first (automounted submounts keep /mnt busy).
unmount_all() {
    for _m in $(awk '$3 == "virtiofs" {print length($2) " " $2}' /proc/mounts | sort -rn | cut -d' ' -f2); do
        umount "$_m"
        mark unmounted "$_m" rc=$?
    done
}
