"""`fsinspect extcap`: Wireshark's extcap interface, exercised by real tshark 4.0.

The registry lives in a private runtime dir (FSINSPECT_RUNTIME_DIR) and Wireshark's personal folders in a
private HOME, so nothing here touches the user's own Wireshark set-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fsinspect.guest.build import GuestImage
from fsinspect.guest.share import Share
from fsinspect.live import registry
from fsinspect.live.hub import Hub
from tests.guest_fixtures import explain
from tests.test_proxy_e2e import boot, exchanges, proxy_in_front
from tests.test_recording_samples import LUA
from tests.test_tui import SYNCFS, _publish_sample, golden

FSINSPECT = [sys.executable, "-m", "fsinspect"]
needs_tshark = pytest.mark.skipif(not Path("/usr/bin/tshark").exists(), reason="tshark not installed")


@pytest.fixture
def wireshark_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A private runtime dir (for this process and the sources it starts) and a HOME for tshark."""
    monkeypatch.setenv(registry.ENV_RUNTIME, str(tmp_path / "run"))
    monkeypatch.delenv(registry.ENV_SOCKETS, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    return env


def extcap(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FSINSPECT, "extcap", *args], capture_output=True, text=True, timeout=60, env=env)


def test_a_hub_registers_while_it_runs_and_extcap_lists_it(tmp_path: Path, wireshark_home: dict[str, str]) -> None:
    hub = Hub(str(tmp_path / "ctl.sock"), lambda: {})
    try:
        name = registry.name_for(hub.path)
        res = extcap(wireshark_home, "--extcap-interfaces", "--extcap-version=4.0")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[0].startswith("extcap {version=")
        assert f"interface {{value={name}}}{{display=fsinspect (virtio-fs/FUSE): {hub.path}}}" in lines
        dlts = extcap(wireshark_home, "--extcap-interface", name, "--extcap-dlts").stdout
        assert dlts.startswith("dlt {number=252}{name=WIRESHARK_UPPER_PDU}")
        assert "{call=--filter}" in extcap(wireshark_home, "--extcap-interface", name, "--extcap-config").stdout
        # Wireshark validates a capture filter: nothing printed means valid, else the reason.
        ok = extcap(wireshark_home, "--extcap-interface", name, "--extcap-capture-filter", "op == SYNCFS")
        assert ok.returncode == 0 and ok.stdout == ""
        bad = extcap(wireshark_home, "--extcap-interface", name, "--extcap-capture-filter", "op == NOPE")
        assert "unknown opcode 'NOPE'" in bad.stdout
    finally:
        hub.close()
    gone = extcap(wireshark_home, "--extcap-interfaces").stdout
    assert name not in gone  # unregistered on close


def test_a_dead_source_is_not_listed_and_a_named_one_is(tmp_path: Path, wireshark_home: dict[str, str]) -> None:
    """A killed proxy leaves its link behind: the next lookup drops it.  $FSINSPECT_CONTROL names others."""
    hub = Hub(str(tmp_path / "ctl.sock"), lambda: {})
    link = hub._registered
    assert link is not None and link.is_symlink()
    hub._registered = None  # as if the process had died without closing
    hub.close()
    other = str(tmp_path / "elsewhere.sock")
    env = {**wireshark_home, registry.ENV_SOCKETS: other}
    out = extcap(env, "--extcap-interfaces").stdout
    assert registry.name_for(str(tmp_path / "ctl.sock")) not in out and not link.is_symlink()
    assert f"value={registry.name_for(other)}" in out
    res = extcap(env, "--capture", "--extcap-interface", registry.name_for(other), "--fifo", str(tmp_path / "f"))
    assert res.returncode != 0 and "cannot connect" in res.stderr and "Traceback" not in res.stderr


@needs_tshark
def test_install_then_tshark_captures_live(tmp_path: Path, wireshark_home: dict[str, str]) -> None:
    res = extcap(wireshark_home, "--install")
    assert res.returncode == 0, res.stderr
    home = Path(wireshark_home["HOME"])
    launcher = home / ".config" / "wireshark" / "extcap" / "fsinspect-extcap"
    assert launcher.stat().st_mode & 0o111
    lua = home / ".local" / "lib" / "wireshark" / "plugins" / "fsinspect-fuse.lua"
    assert lua.read_text() == LUA.read_text()
    lock = threading.RLock()
    hub = Hub(str(tmp_path / "ctl.sock"), lambda: {}, feed_lock=lock, queue_len=100_000)
    name = registry.name_for(hub.path)
    try:
        listed = subprocess.run(["tshark", "-D"], capture_output=True, text=True, timeout=120, env=wireshark_home)
        assert name in listed.stdout, listed
        # The installed dissector decodes (no -X); the capture filter is fsinspect's filter language.
        tshark = subprocess.Popen(["tshark", "-i", name, "-f", "op == SYNCFS", "-a", "duration:120", "-T", "fields",
                                   "-e", "fuse.opcode", "-e", "fuse.unique", "-e", "fuse.reply"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=wireshark_home)
        deadline = time.monotonic() + 60
        while not hub.clients:
            assert tshark.poll() is None, tshark.communicate()
            assert time.monotonic() < deadline, "the extcap never attached"
            time.sleep(0.05)
        _publish_sample(hub, lock, SYNCFS)
    finally:
        hub.close()  # the source ends: the extcap closes the FIFO and tshark ends
    out, err = tshark.communicate(timeout=120)
    assert "Error" not in err.decode(), err
    want = [g["unique"] for g in golden("guest-syncfs") if g["opcode"] == "SYNCFS"]
    rows = [x.split("\t") for x in out.decode().splitlines()]
    assert [(r[0], int(r[1]), r[2]) for r in rows] == [x for u in want for x in (("50", u, "0"), ("50", u, "1"))]


@pytest.mark.guest
@pytest.mark.root
@needs_tshark
def test_real_guest_syncfs_through_extcap_and_headless_attach(guest_image: GuestImage, guest_share: Share,
                                                            tmp_path: Path, wireshark_home: dict[str, str]) -> None:
    """Acceptance: `tshark -i <fsinspect interface> -X lua_script:recordings/fuse.lua` and `fsinspect attach
    --format jsonl --filter 'op == SYNCFS'` both see the syncfs workload's SYNCFS, as the recording does: one per
    superblock (root and two submounts) on `sync`, then one per mount again on `sync -f`: 3 + 3."""
    assert extcap(wireshark_home, "--install", "--no-lua").returncode == 0
    ctrl = tmp_path / "ctl.sock"
    with proxy_in_front(guest_share, tmp_path, extra=("--control", str(ctrl))) as run:
        deadline = time.monotonic() + 20
        while not ctrl.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        name = registry.name_for(str(ctrl))
        tshark = subprocess.Popen(["tshark", "-i", name, "-X", f"lua_script:{LUA}", "-a", "duration:300",
                                   "-Y", "fuse.opcode == 50 && fuse.reply == 0", "-T", "fields", "-e", "fuse.unique",
                                   "-e", "fuse.nodeid"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=wireshark_home)
        attach = subprocess.Popen([*FSINSPECT, "attach", str(ctrl), "--format", "jsonl", "--filter", "op == SYNCFS"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Both attached before the guest boots (the hub counts its clients in the proxy's summary later).
        time.sleep(3)
        assert tshark.poll() is None and attach.poll() is None
        res = boot(guest_image, run, "syncfs", timeout=120)
        assert res.ok, explain(res)
        aout, aerr = attach.communicate(timeout=60)
        tout, terr = tshark.communicate(timeout=120)
    assert attach.returncode == 0, aerr
    rec = [(ex.unique, ex.nodeid) for ex in exchanges(run.record).exchanges if ex.opname == "SYNCFS"]
    assert len(rec) == 6 and len({nodeid for _, nodeid in rec[:3]}) == 3 and {n for _, n in rec[3:]} == {n for _, n in rec[:3]}
    rows = [json.loads(x) for x in aout.splitlines()]
    assert [(r["unique"], r["nodeid"]) for r in rows] == rec
    assert [r["error"] for r in rows] == [None] * 6
    assert b"Error" not in terr, terr
    got = [tuple(int(v) for v in x.split("\t")) for x in tout.decode().splitlines()]
    assert got == rec
