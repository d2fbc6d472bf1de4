"""`./scripts/setup` on a fresh copy of the tree prints nothing when all goes well (issue 16 item 6: it
printed a page of pip and setuptools warnings), and the result works: the C ring engine is built and
bench/standalone.py's pyfuse3 peer is installed (issue 20: it was only in the [bench] extra)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_fresh_setup_is_quiet_and_builds_the_ring(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
    files = [f for f in archive.decode().split("\0") if f and (ROOT / f).is_file()]
    subprocess.run(["tar", "-C", str(ROOT), "-cf", str(tmp_path / "t.tar"), "--null", "-T", "-"],
                   input="\0".join(files).encode(), check=True)
    subprocess.run(["tar", "-C", str(tree), "-xf", str(tmp_path / "t.tar")], check=True)
    res = subprocess.run(["./scripts/setup"], cwd=tree, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == "", (res.stdout, res.stderr)
    ok = subprocess.run([str(tree / ".venv/bin/python"), "-c", "import dissectors.ring._ring, fsinspect, pyfuse3, trio"],
                        cwd=tree, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
