# demo: what `fsinspect demo` shows - crud, a metadata storm, a dd, and a sync per superblock, in a
# loop (`loops`, default 1; 0 = until powered off).  Small by default so that one pass takes seconds.
wl_demo() {
    _loops=$(param loops 1)
    _i=1
    while [ "$_loops" -eq 0 ] || [ "$_i" -le "$_loops" ]; do
        mark loop "$_i"
        wl_crud
        wl_storm
        wl_io
        wl_syncfs
        _i=$((_i + 1))
    done
}
