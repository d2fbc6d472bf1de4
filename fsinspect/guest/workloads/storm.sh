# storm: N creates, stats warm (attributes cached) and cold (after drop_caches), deletes.
# Shell builtins only (no fork per file), so the time is the file system's, not busybox's.
STORM=$MNT/.fsi-storm

storm_create() {
    _i=0
    while [ $_i -lt "$STORM_N" ]; do
        : >"$STORM/f$_i" || { mark check-fail "$STEP" "create f$_i"; return 1; }
        _i=$((_i + 1))
    done
}

storm_stat() {
    _i=0
    while [ $_i -lt "$STORM_N" ]; do
        [ -f "$STORM/f$_i" ] || { mark check-fail "$STEP" "stat f$_i"; return 1; }
        _i=$((_i + 1))
    done
}

# One rm process for all N files (a fork per file would time busybox, not the file system).
storm_delete() {
    must "rm -r" rm -r "$STORM" || return 1
    expect "storm dir gone" "$([ -e "$STORM" ] && echo present || echo absent)" absent
}

wl_storm() {
    STORM_N=$(param n 2000)
    rm -rf "$STORM"
    mkdir "$STORM" || { mark error "mkdir $STORM"; FAILED="$FAILED storm"; return; }
    mark metric storm n=$STORM_N
    step storm-create storm_create
    step storm-stat-warm storm_stat
    drop_caches
    step storm-stat-cold storm_stat
    step storm-delete storm_delete
}
