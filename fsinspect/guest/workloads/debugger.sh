# dbg_*: the debugger's acceptance steps (issue 15).  The host sets --inject/--break rules on the proxy or
# the daemon; each step reports what the guest saw (return codes, errno words, timings in centiseconds)
# as metrics, and the host judges.  errword turns "stat: can't stat '/mnt/x': No such file or directory"
# into No_such_file_or_directory.
errword() { sed -n '$s/.*: //p' "$1" | tr -c 'A-Za-z\n' '_' | head -n 1; }

# An --inject rule answers the LOOKUP of `victim` with ENOENT: stat fails although the file exists.
dbg_enoent() {
    stat -c %s "$MNT/victim" >/dev/null 2>/tmp/dbg.err
    _rc=$?
    mark metric dbg-victim rc=$_rc err="$(errword /tmp/dbg.err)"
    must "stat bystander" stat -c %s "$MNT/bystander" >/dev/null || return 1
    _ls=$(ls "$MNT" | grep -c '^victim$')
    mark metric dbg-listed victim=$_ls
}

# One SYNCFS per superblock: `sync -f` on each mount, outermost first (an --inject rule fails one).
# GNU sync (/usr/bin/sync): busybox's ignores what syncfs(2) returns.
dbg_syncfs() {
    syncfs_touch || return 1
    _sync=/usr/bin/sync
    [ -x "$_sync" ] || { mark error "no GNU sync in the guest: syncfs errors would go unseen"; return 1; }
    for _p in $(sub_paths); do
        "$_sync" -f "$_p" 2>/tmp/dbg.err
        _rc=$?
        mark metric "dbg-syncfs-$(echo "${_p#$MNT}" | tr -c 'A-Za-z0-9\n' '_')" rc=$_rc err="$(errword /tmp/dbg.err)"
    done
    sync
    mark metric dbg-sync rc=$?
    syncfs_cleanup
}

# Stat one file `n` times (cache=none: each is a LOOKUP and a GETATTR), each timed.
dbg_delay() {
    _i=0
    _times=""
    while [ $_i -lt "$(param n 8)" ]; do
        read_cs
        _t0=$NOW_CS
        must "stat f" stat -c %s "$MNT/bystander" >/dev/null || return 1
        read_cs
        _times="$_times t$_i=$((NOW_CS - _t0))"
        _i=$((_i + 1))
    done
    mark metric dbg-delay $_times
}

# mkdir in the background while a breakpoint holds MKDIR; stat other files meanwhile; report how it ended.
# Twice: the host releases the first and answers the second.  The mkdir is in $MNT/dbg: the guest kernel
# holds that directory's lock while MKDIR waits, so a lookup in it would wait too (the stats are in $MNT).
dbg_break_one() {
    mkdir "$MNT/dbg/$1" 2>/tmp/dbg-mkdir.err &
    _pid=$!
    mark dbg-mkdir-started "$1"
    _n=0
    while [ $_n -lt "$(param files 5)" ]; do
        stat -c %s "$MNT/bystander" >/dev/null || { mark check-fail "$STEP" "stat while held"; return 1; }
        _n=$((_n + 1))
    done
    if kill -0 $_pid 2>/dev/null; then _pending=1; else _pending=0; fi
    mark metric "dbg-break-$1" served=$_n pending=$_pending
    wait $_pid
    _rc=$?
    mark metric "dbg-mkdir-$1" rc=$_rc err="$(errword /tmp/dbg-mkdir.err)" isdir=$([ -d "$MNT/dbg/$1" ] && echo 1 || echo 0)
}

dbg_break() {
    dbg_break_one released || return 1
    dbg_break_one answered
}

# A READ whose reply an --inject rule rewrites to EIO once: the first read fails, the second reads it.
# dd, not cat: busybox cat copies with sendfile and silently falls back to read() when that fails.
dbg_read() {
    dd if="$MNT/data" of=/tmp/dbg.out bs=64k 2>/tmp/dbg.err
    _rc=$?
    mark metric dbg-read-1 rc=$_rc err="$(grep -v records /tmp/dbg.err | tail -n 1 | sed 's/.*: //' | tr -c 'A-Za-z\n' '_')"
    dd if="$MNT/data" of=/tmp/dbg.out bs=64k 2>/tmp/dbg.err
    _rc=$?
    mark metric dbg-read-2 rc=$_rc size="$(wc -c </tmp/dbg.out)"
}

wl_dbg_enoent() { step dbg-enoent dbg_enoent; }
wl_dbg_syncfs() { step dbg-syncfs dbg_syncfs; }
wl_dbg_delay() { step dbg-delay dbg_delay; }
wl_dbg_break() { step dbg-break dbg_break; }
wl_dbg_read() { step dbg-read dbg_read; }
