"""Build the optional C extensions; all metadata lives in pyproject.toml.

- dissectors/ring/_ring: the split-ring engine (twin: dissectors/ring/_native.py);
- daemon/passthrough/_sys: the passthrough filesystem's hot syscalls with the GIL released (twin:
  daemon/passthrough/syscalls.py over ctypes).

`optional=True`: without a compiler the build still succeeds, and each falls back to its pure-Python
twin, saying so at start-up.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dissectors.ring._ring",
            sources=["dissectors/ring/_ringmodule.c", "dissectors/ring/ring_core.c"],
            depends=["dissectors/ring/ring_core.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
                                "-Wno-cast-function-type"],
            optional=True,
        ),
        Extension(
            "daemon.passthrough._sys",
            sources=["daemon/passthrough/_sysmodule.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        ),
    ],
)
