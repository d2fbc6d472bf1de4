# concurrent: 6 parallel create/stat/read loops (400 files each) plus a 32 MiB dd at the same time.
# Some ring races only show up with several requests in flight (see proxy-notes.md).
CONC=$MNT/.fsi-concurrent

conc_loop() {
    _d="$CONC/l$1"
    mkdir "$_d" || { echo "mkdir $_d" >"/tmp/conc.err.$1"; return 1; }
    _i=0
    while [ $_i -lt "$CONC_N" ]; do
        echo "$1-$_i" >"$_d/f$_i" || { echo "create f$_i" >"/tmp/conc.err.$1"; return 1; }
        [ -f "$_d/f$_i" ] || { echo "stat f$_i" >"/tmp/conc.err.$1"; return 1; }
        read -r _v <"$_d/f$_i"
        [ "$_v" = "$1-$_i" ] || { echo "read f$_i: $_v" >"/tmp/conc.err.$1"; return 1; }
        _i=$((_i + 1))
    done
}

conc_run() {
    rm -rf "$CONC" /tmp/conc.err.*
    must "mkdir" mkdir "$CONC" || return 1
    _j=1
    while [ $_j -le "$CONC_L" ]; do
        conc_loop $_j &
        _j=$((_j + 1))
    done
    dd if=/dev/zero of="$CONC/big" bs=1M count="$CONC_MB" conv=fsync 2>/tmp/conc.dd || echo "dd" >/tmp/conc.err.dd &
    wait
    _bad=0
    for _e in /tmp/conc.err.*; do
        [ -e "$_e" ] || continue
        mark check-fail "$STEP" "${_e#/tmp/conc.err.}: $(cat "$_e")"
        _bad=1
    done
    expect "dd size" "$(stat -c %s "$CONC/big")" $((CONC_MB * 1048576)) || _bad=1
    _files=$(ls "$CONC"/l* | grep -c '^f')
    expect "files" "$_files" $((CONC_L * CONC_N)) || _bad=1
    rm -rf "$CONC"
    return $_bad
}

wl_concurrent() {
    CONC_L=$(param conc_loops 6)
    CONC_N=$(param conc_iters 400)
    CONC_MB=$(param conc_mb 32)
    mark metric concurrent loops=$CONC_L iters=$CONC_N dd_mb=$CONC_MB
    step concurrent conc_run
}
