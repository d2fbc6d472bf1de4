"""The C ring engine (and the block scanner) builds from a fresh clone, and without a compiler the twin takes over, loudly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _py(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess[str]:
    # -S: no site-packages, so the editable install cannot redirect `dissectors` back to this checkout
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, capture_output=True, text=True, timeout=300, **kw)


def test_fresh_clone_builds_and_loads_the_c_engine(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    assert not list((clone / "dissectors" / "ring").glob("*.so"))
    b = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=clone,
                       capture_output=True, text=True, timeout=300)
    assert b.returncode == 0, b.stderr[-3000:]
    assert list((clone / "dissectors" / "ring").glob("_ring*.so"))
    r = _py(["-c", "import dissectors.ring as r; print(r.BACKEND, r.__file__)"], clone)
    assert r.returncode == 0, r.stderr
    backend, path = r.stdout.split()
    assert backend == "c" and path.startswith(str(clone))
    assert "unavailable" not in r.stderr
    assert list((clone / "fsinspect" / "recording").glob("_scan*.so"))  # the live stream's block scanner
    r = _py(["-c", "import fsinspect.recording.scan as s; print(s.BACKEND, s.__file__)"], clone)
    assert r.returncode == 0, r.stderr
    backend, path = r.stdout.split()
    assert backend == "c" and path.startswith(str(clone))


def test_no_compiler_optional_build_succeeds_and_twin_is_announced(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "dissectors", src / "dissectors", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(ROOT / "setup.py", src)
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    env = {"PATH": "/usr/bin:/bin", "CC": "/bin/false", "LDSHARED": "/bin/false"}
    b = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, capture_output=True,
                       text=True, timeout=300, env=env)
    assert b.returncode == 0, b.stderr[-3000:]  # optional=True: a failed compile is not a failed install
    assert not list((src / "dissectors" / "ring").glob("*.so"))
    r = _py(["-c", "import logging; logging.basicConfig(); import dissectors.ring as r; print(r.BACKEND)"], src)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "python"
    assert "C extension unavailable" in r.stderr and "pure-Python twin" in r.stderr
