# full: every workload except concurrent and hold, in one boot.
wl_full() {
    wl_smoke
    wl_crud
    wl_submounts
    wl_syncfs
    wl_storm
    wl_io
}
