"""Build the optional C extensions; all metadata lives in pyproject.toml.

- dissectors/ring/_ring: the split-ring engine (twin: dissectors/ring/_native.py);
- fsinspect/recording/_scan: the live stream's packet-block scanner (twin: fsinspect/recording/scan.py);
- daemon/passthrough/_sys: the passthrough filesystem's hot syscalls with the GIL released (twin:
  daemon/passthrough/syscalls.py over ctypes);
- daemon/passthrough/_fast: the fast path of the commonest metadata requests (twin: the Python op table,
  daemon/server.py and daemon/passthrough/fs.py).
- daemon/transport/_uring: FUSE-over-io_uring ring mechanics with the GIL released (twin:
  daemon/transport/uring_py.py over ctypes and mmap).

`optional=True`: without a compiler the build still succeeds, and each falls back to its pure-Python
twin, saying so at start-up.
"""

from setuptools import Extension, setup

WARN = ["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]


def ext(name: str, sources: list[str], depends: tuple[str, ...] | list[str] = (),
        extra: tuple[str, ...] | list[str] = ()) -> Extension:
    return Extension(name, sources=sources, depends=list(depends), extra_compile_args=WARN + list(extra),
                     optional=True)


setup(
    ext_modules=[
        ext("dissectors.ring._ring", ["dissectors/ring/_ringmodule.c", "dissectors/ring/ring_core.c"],
            ["dissectors/ring/ring_core.h", "dissectors/ring/ring_answer.h"], ["-Wno-cast-function-type"]),
        ext("fsinspect.recording._scan", ["fsinspect/recording/_scanmodule.c", "fsinspect/recording/scan_core.c"],
            ["fsinspect/recording/scan_core.h"], ["-Wno-cast-function-type"]),
        ext("daemon.passthrough._sys", ["daemon/passthrough/_sysmodule.c"]),
        ext("daemon.passthrough._fast", ["daemon/passthrough/_fastmodule.c"], ["dissectors/ring/ring_answer.h"]),
        ext("daemon.transport._uring", ["daemon/transport/_uringmodule.c"]),
    ],
)
