# io: dd a file with fsync, drop caches, read it back, checksum it (the host compares its own hash).
# The file stays in the share (.fsi-io.bin) so the host can hash it; the next run overwrites it.
IOF=$MNT/.fsi-io.bin

# The source is built in guest RAM first, so io-write times the file system, not the data source.
# A random 1 MiB seed, doubled until big enough (few forks: cheap under TCG) and never all-zero.
io_prepare() {
    must "seed" dd if=/dev/urandom of=/tmp/io.src bs=1M count=1 2>/dev/null || return 1
    _mb=1
    while [ $_mb -lt "$IO_MB" ]; do
        cat /tmp/io.src /tmp/io.src >/tmp/io.tmp || return 1
        mv /tmp/io.tmp /tmp/io.src
        _mb=$((_mb * 2))
    done
    if [ $_mb -gt "$IO_MB" ]; then
        dd if=/tmp/io.src of=/tmp/io.tmp bs=1M count="$IO_MB" 2>/dev/null && mv /tmp/io.tmp /tmp/io.src || return 1
    fi
    IO_WANT=$(sha256sum </tmp/io.src)
}

io_write() {
    dd if=/tmp/io.src of="$IOF" bs=1M conv=fsync 2>/tmp/dd.err || {
        mark check-fail "$STEP" "dd write: $(cat /tmp/dd.err)"; return 1; }
    expect "size" "$(stat -c %s "$IOF")" $((IO_MB * 1048576))
}

io_read() {
    dd if="$IOF" of=/dev/null bs=1M 2>/tmp/dd.err || {
        mark check-fail "$STEP" "dd read: $(cat /tmp/dd.err)"; return 1; }
}

io_sum() {
    _s=$(sha256sum "$IOF") || return 1
    mark sum "${_s%% *}" "$IOF"
    expect "same bytes as written" "${_s%% *}  -" "$IO_WANT"
    rm -f /tmp/io.src
}

wl_io() {
    IO_MB=$(param io_mb 64)
    mark metric io bytes=$((IO_MB * 1048576))
    step io-prepare io_prepare
    step io-write io_write
    step io-drop-caches drop_caches
    step io-read io_read
    step io-sum io_sum
}
