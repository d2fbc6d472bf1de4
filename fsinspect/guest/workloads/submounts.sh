# submounts: trigger the automounts, report st_dev of /mnt and each nested submount, the virtiofs
# mount lines, and write inside every submount.
subm_access() {
    for _p in $(sub_paths); do
        must "access $_p" ls -d "$_p/." || return 1  # a path walk into it triggers the automount
    done
}

subm_stat() {
    for _p in $(sub_paths); do stat_mark "$_p" || return 1; done
}

subm_mounts() {
    _n=0
    while read -r _l; do
        case "$_l" in
            *" virtiofs "*) mark mount "$_l"; _n=$((_n + 1)) ;;
        esac
    done </proc/mounts
    mark metric "$STEP" virtiofs_mounts=$_n
}

subm_write() {
    for _p in $(sub_paths); do
        _f="$_p/.fsi-submount-write"
        echo "written in $_p" >"$_f" || { mark check-fail "$STEP" "write $_f"; return 1; }
        expect "read back $_f" "$(cat "$_f")" "written in $_p" || return 1
        stat_mark "$_f" || return 1
        must "rm $_f" rm "$_f" || return 1
    done
}

wl_submounts() {
    step submounts-access subm_access
    step submounts-stat subm_stat
    step submounts-mounts subm_mounts
    step submounts-write subm_write
}
