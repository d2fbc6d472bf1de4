# smoke: list the share, stat it, show the mount table, checksum small top-level files.
smoke_ls() {
    ls -la "$MNT" >/tmp/ls.out || return 1
    ls -A "$MNT" >/tmp/ls.names || return 1
    while read -r _n; do mark entry "$_n"; done </tmp/ls.names
}

smoke_stat() {
    stat_mark "$MNT" || return 1
    for _p in "$MNT"/* "$MNT"/.[!.]*; do
        [ -e "$_p" ] || [ -L "$_p" ] || continue
        stat_mark "$_p" || return 1
    done
}

# sha256 of regular files up to 1 MiB at the top level, for comparison with the host's bytes.
smoke_read() {
    for _p in "$MNT"/*; do
        [ -f "$_p" ] && [ ! -L "$_p" ] || continue
        [ "$(stat -c %s "$_p")" -le 1048576 ] || continue
        _s=$(sha256sum "$_p") || return 1
        mark sum "${_s%% *}" "$_p"
    done
}

wl_smoke() {
    step smoke-ls smoke_ls
    step smoke-stat smoke_stat
    step smoke-mounts mounts_mark
    step smoke-read smoke_read
}
