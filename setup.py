"""Build the optional C ring engine (dissectors/ring/_ring); all metadata lives in pyproject.toml.

`optional=True`: without a compiler the build still succeeds, and dissectors.ring falls back to the
pure-Python twin, saying so at start-up.
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
        )
    ],
)
