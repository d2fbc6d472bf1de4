# hold: steady traffic (write, read back, stat, unlink) with a tick marker about every 0.2 s, for
# `seconds` (default 60): the disconnect tests kill the backend meanwhile.  A dead backend leaves the
# next request hanging in D state, so the ticks stop: that silence is what the launcher watches.
HOLD=$MNT/.fsi-hold

hold_run() {
    rm -rf "$HOLD"
    must "mkdir" mkdir "$HOLD" || return 1
    read_cs
    _end=$((NOW_CS + $(param seconds 60) * 100))
    _last=0
    _i=0
    while :; do
        echo "$_i" >"$HOLD/f" || { mark check-fail "$STEP" "write"; return 1; }
        read -r _v <"$HOLD/f"
        expect "read back" "$_v" "$_i" || return 1
        rm "$HOLD/f" || { mark check-fail "$STEP" "unlink"; return 1; }
        _i=$((_i + 1))
        read_cs
        if [ $((NOW_CS - _last)) -ge 20 ]; then
            mark tick $_i "$_up"
            _last=$NOW_CS
        fi
        [ "$NOW_CS" -lt "$_end" ] || break
    done
    rmdir "$HOLD"
}

wl_hold() {
    step hold hold_run
}
