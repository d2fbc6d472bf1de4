# soak: the concurrent workload in rounds until soak_s seconds of guest uptime have passed (bench/soak.py),
# one step per round, then a last round trip through the mount (create, read back, list, remove) to show
# the guest is still responsive after the long run.
soak_alive() {
    _f=$MNT/.fsi-soak-alive
    echo "alive" >"$_f" || { mark check-fail "$STEP" "create $_f"; return 1; }
    read -r _v <"$_f"
    expect "read back" "$_v" alive || return 1
    ls "$MNT" >/dev/null || { mark check-fail "$STEP" "ls $MNT"; return 1; }
    must "rm" rm "$_f"
}

wl_soak() {
    CONC_L=$(param conc_loops 6)
    CONC_N=$(param conc_iters 400)
    CONC_MB=$(param conc_mb 32)
    read_cs
    _end=$((NOW_CS + $(param soak_s 60) * 100))
    _round=0
    while [ "$NOW_CS" -lt "$_end" ]; do
        _round=$((_round + 1))
        step "soak-$_round" conc_run
        read_cs
    done
    mark metric soak rounds=$_round loops=$CONC_L iters=$CONC_N dd_mb=$CONC_MB
    step soak-alive soak_alive
}
