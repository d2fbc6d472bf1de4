# syncfs: touch every submount first (automounts happen on access), dirty each, then sync (one
# FUSE_SYNCFS per virtiofs superblock), then a per-mount syncfs with `sync -f`.
syncfs_touch() {
    for _p in $(sub_paths); do
        must "dirty $_p" dd if=/dev/zero of="$_p/.fsi-syncfs" bs=4k count=4 2>/dev/null || return 1
    done
}

syncfs_per_mount() {
    for _p in $(sub_paths); do must "sync -f $_p" sync -f "$_p" || return 1; done
}

syncfs_cleanup() {
    for _p in $(sub_paths); do must "rm" rm -f "$_p/.fsi-syncfs" || return 1; done
}

wl_syncfs() {
    step syncfs-touch syncfs_touch
    step syncfs-sync sync
    step syncfs-per-mount syncfs_per_mount
    step syncfs-cleanup syncfs_cleanup
}
