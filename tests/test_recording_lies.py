"""Recordings that lie: `info`, `stats`, `export` and the replay UI (panel 4) on corrupted samples.

Each variant is the sample with one lie in it: a block body shorter than its fixed part, captured bytes
past their block, a JSON option of the wrong type, a timestamp centuries ahead, random bit flips and
truncations.  The readers must end in one line (or read what they can), never a traceback, never a hang,
never runaway memory.  The blocks are rebuilt here from the pcapng draft, independently of the reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from dissectors import fuse as F
from fsinspect.cli import main
from fsinspect.recording import format as fmt
from fsinspect.recording.index import RecordingIndex
from fsinspect.recording.reader import RecordingError, RecordingReader
from fsinspect.recording.writer import RecordingWriter
from fsinspect.tui.app import FsInspectApp
from fsinspect.tui.panels import StatsPanel
from fsinspect.tui.sources import ReplaySource, Store

SAMPLE = Path(__file__).resolve().parent.parent / "recordings" / "samples" / "fusedev-workload.pcapng"
COMMANDS = (["info"], ["info", "--json"], ["stats"], ["stats", "--json"], ["export"], ["export", "--format", "json"])
Block = tuple[int, bytes]  # (block type, body)


# ---- a pcapng block codec for the test (the draft's layout, not the reader's code) -------------------------
def blocks(data: bytes) -> list[Block]:
    out, off = [], 0
    while off < len(data):
        btype, total = struct.unpack_from("<II", data, off)
        out.append((btype, data[off + 8:off + total - 4]))
        off += total
    return out


def pack(bl: list[Block]) -> bytes:
    return b"".join(struct.pack("<II", t, 12 + len(b)) + b + struct.pack("<I", 12 + len(b)) for t, b in bl)


def options(body: bytes, start: int) -> list[tuple[int, bytes]]:
    out, off = [], start
    while off + 4 <= len(body):
        code, ln = struct.unpack_from("<HH", body, off)
        if code == 0:
            break
        out.append((code, body[off + 4:off + 4 + ln]))
        off += 4 + ln + (-ln % 4)
    return out


def with_options(fixed: bytes, opts: list[tuple[int, bytes]]) -> bytes:
    raw = b"".join(struct.pack("<HH", c, len(v)) + v + b"\0" * (-len(v) % 4) for c, v in opts)
    return fixed + raw + struct.pack("<HH", 0, 0)


def edit_json(body: bytes, start: int, change: Callable[[dict[str, Any]], None]) -> bytes:
    """Rewrite the fsinspect JSON option of a block body (fixed part of `start` bytes)."""
    opts = options(body, start)
    for i, (code, val) in enumerate(opts):
        if code == fmt.OPT_CUSTOM_STR and struct.unpack_from("<I", val)[0] == fmt.PEN:
            obj = json.loads(val[4:])
            change(obj)
            opts[i] = (code, val[:4] + json.dumps(obj).encode())
    return with_options(body[:start], opts)


SHB_FIXED, IDB_FIXED, EPB_FIXED = 16, 8, 20


def first(bl: list[Block], btype: int) -> int:
    return next(i for i, (t, _) in enumerate(bl) if t == btype)


def lie(kind: str, arg: Any = None) -> bytes:
    """The sample with one lie of `kind` in it."""
    bl = blocks(SAMPLE.read_bytes())
    if kind == "epb_short":
        i = first(bl, fmt.BT_EPB)
        bl[i] = (fmt.BT_EPB, bl[i][1][:arg])
    elif kind == "idb_short":
        i = first(bl, fmt.BT_IDB)
        bl[i] = (fmt.BT_IDB, bl[i][1][:arg])
    elif kind == "epb_caplen":
        i = first(bl, fmt.BT_EPB)
        b = bytearray(bl[i][1])
        struct.pack_into("<I", b, 12, len(b) + 100)
        bl[i] = (fmt.BT_EPB, bytes(b))
    elif kind == "idb_json":
        i = first(bl, fmt.BT_IDB)
        key, value = arg
        bl[i] = (fmt.BT_IDB, edit_json(bl[i][1], IDB_FIXED, lambda o: o.__setitem__(key, value)))
    elif kind == "shb_init":
        def set_init(o: dict[str, Any]) -> None:
            if arg[0] == "init":
                o["init"] = arg[1]
            else:
                o["init"] = {"epoch": 0, "request": "00" * 8, **o.get("init", {}), arg[0]: arg[1]}
        bl[0] = (fmt.BT_SHB, edit_json(bl[0][1], SHB_FIXED, set_init))
    elif kind == "epb_year_2500":
        i = [j for j, (t, _) in enumerate(bl) if t == fmt.BT_EPB][arg]
        b = bytearray(bl[i][1])
        struct.pack_into("<II", b, 4, 0xFFFF_FFF0, 0)  # ~2^64 ns: the year 2554
        bl[i] = (fmt.BT_EPB, bytes(b))
    else:
        raise AssertionError(kind)
    return pack(bl)


LIES: dict[str, tuple[str, Any, str | None]] = {
    # name: (kind, arg, what the one-line error says; None = read, no error)
    **{f"epb_body_{n}": ("epb_short", n, "fewer than its fixed 20") for n in (0, 4, 12, 16)},
    **{f"idb_body_{n}": ("idb_short", n, "fewer than its fixed 8") for n in (0, 4)},
    # not a multiple of 4: the framing is broken there, so the file is read up to that block (a warning)
    "epb_body_19": ("epb_short", 19, None),
    "idb_body_7": ("idb_short", 7, None),
    "epb_caplen_past_block": ("epb_caplen", None, "captured bytes"),
    "idb_queue_list": ("idb_json", ("queue", [1]), "queue [1]"),
    "idb_queue_string": ("idb_json", ("queue", "1"), "queue '1'"),
    "idb_queue_negative": ("idb_json", ("queue", -1), "queue -1"),
    "idb_queue_float": ("idb_json", ("queue", 1.5), "queue 1.5"),
    "idb_queue_bool": ("idb_json", ("queue", True), "queue True"),
    "idb_kind_number": ("idb_json", ("kind", 7), "kind 7"),
    "shb_init_epoch_text": ("shb_init", ("epoch", "text"), "`init.epoch` is 'text'"),
    "shb_init_list": ("shb_init", ("init", [1, 2]), "`init` is list"),
    "shb_init_request_number": ("shb_init", ("request", 5), "must be hex strings"),
    "shb_init_request_not_hex": ("shb_init", ("request", "zz"), "is not hex"),
    "epb_year_2500_first": ("epb_year_2500", 0, None),
    "epb_year_2500_middle": ("epb_year_2500", 40, None),
}


def run_cli(path: Path, args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*args, str(path)])
    return rc, out.getvalue(), err.getvalue()


def check_commands(path: Path, says: str | None = None, mem_mb: float = 64, seconds: float = 20) -> None:
    """Every command ends with 0 or a one-line error; bounded time and memory.  So does the side index."""
    try:
        RecordingIndex(path, rebuild=True).close()
    except RecordingError as e:
        assert "\n" not in str(e)
    for args in COMMANDS:
        tracemalloc.start()
        t0 = time.monotonic()
        try:
            rc, _out, err = run_cli(path, args)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        took = time.monotonic() - t0
        assert took < seconds, f"{args}: {took:.1f} s"
        assert peak < mem_mb * 2**20, f"{args}: {peak / 2**20:.0f} MB"
        assert "Traceback" not in err
        if rc:
            assert rc in (1, 2) and len(err.strip().splitlines()) == 1, (args, rc, err)
            assert err.startswith(f"fsinspect {args[0]}: "), err
        else:
            assert all(ln.startswith("fsinspect") for ln in err.strip().splitlines()), err  # warnings only
        if says is not None:
            assert rc and says in err, (args, rc, err)


@pytest.mark.parametrize("name", list(LIES))
def test_lying_recording_gives_one_line(name: str, tmp_path: Path) -> None:
    kind, arg, says = LIES[name]
    p = tmp_path / f"{name}.pcapng"
    p.write_bytes(lie(kind, arg))
    check_commands(p, says)


def test_far_future_timestamp_costs_one_rate_point(tmp_path: Path) -> None:
    """One EPB in the year 2554: `stats` counts the seconds that hold data, not the 1.7e10 between."""
    p = tmp_path / "future.pcapng"
    p.write_bytes(lie("epb_year_2500", 40))
    rc, out, err = run_cli(p, ["stats", "--json"])
    assert rc == 0, err
    d = json.loads(out)
    rates = d["ops_per_second"]
    assert len(rates) == d["active_seconds"] <= 10 and all(r > 0 for _, r in rates)
    assert sum(r for _, r in rates) == d["total"]
    assert rates[-1][0] > 500 * 365 * 86400  # the lie is still visible: centuries after the first bucket


# ---- random corruption ----------------------------------------------------------------------------------
def flip(data: bytes, positions: list[int]) -> bytes:
    b = bytearray(data)
    for pos in positions:
        b[pos % len(b)] ^= 1 << (pos % 8)
    return bytes(b)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(positions=hs.lists(hs.integers(min_value=0, max_value=10**9), min_size=1, max_size=8))
def test_bit_flips(positions: list[int], tmp_path: Path) -> None:
    p = tmp_path / "flipped.pcapng"
    p.write_bytes(flip(SAMPLE.read_bytes(), positions))
    check_commands(p)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(cut=hs.integers(min_value=0, max_value=SAMPLE.stat().st_size))
def test_truncations(cut: int, tmp_path: Path) -> None:
    p = tmp_path / "cut.pcapng"
    p.write_bytes(SAMPLE.read_bytes()[:cut])
    check_commands(p)


JSON_VALUES = hs.one_of(hs.none(), hs.booleans(), hs.integers(min_value=-2**70, max_value=2**70),
                        hs.floats(allow_nan=False), hs.text(max_size=8), hs.lists(hs.integers(), max_size=3),
                        hs.dictionaries(hs.text(max_size=4), hs.integers(), max_size=2))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(where=hs.sampled_from(["shb", "idb"]),
       key=hs.sampled_from(["format", "init", "queue", "kind", "snaplen", "part", "tool", "source", "recording"]),
       value=JSON_VALUES)
def test_every_json_field_with_every_type(where: str, key: str, value: Any, tmp_path: Path) -> None:
    bl = blocks(SAMPLE.read_bytes())
    i, fixed = (0, SHB_FIXED) if where == "shb" else (first(bl, fmt.BT_IDB), IDB_FIXED)
    bl[i] = (bl[i][0], edit_json(bl[i][1], fixed, lambda o: o.__setitem__(key, value)))
    p = tmp_path / "typed.pcapng"
    p.write_bytes(pack(bl))
    check_commands(p)


# ---- the replay UI, headless, on panel 4 ------------------------------------------------------------------
UI_CASES = ["epb_body_12", "idb_queue_list", "shb_init_epoch_text", "epb_caplen_past_block",
            "epb_year_2500_first", "epb_year_2500_middle"]


@pytest.mark.parametrize("name", UI_CASES)
def test_replay_ui_panel_4(name: str, tmp_path: Path) -> None:
    kind, arg, says = LIES[name]
    p = tmp_path / f"{name}.pcapng"
    p.write_bytes(lie(kind, arg))
    try:
        source = ReplaySource(Store(), str(p))
    except RecordingError as e:  # refused at open: `fsinspect replay` prints this one line
        assert says is not None and says in str(e)
        return

    async def run() -> None:
        app = FsInspectApp(source)
        async with app.run_test(size=(160, 48)) as pilot:
            deadline = time.monotonic() + 30
            while not (app.store.done or app.store.error):
                assert time.monotonic() < deadline, "replay did not finish"
                await pilot.pause(0.05)
            await pilot.press("4")
            await pilot.pause(0.5)
            panel = app.query_one(StatsPanel)
            assert panel.display
            label = str(panel.query_one("#opslabel").render())
            if says is None:
                assert "with traffic" in label or "bucket" in label
            else:
                assert says in (app.store.error or ""), app.store.error

    tracemalloc.start()
    try:
        asyncio.run(run())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 2**20, f"{peak / 2**20:.0f} MB"


def test_reader_refuses_in_one_line(tmp_path: Path) -> None:
    """The reader itself: RecordingError with the file name, at open or while iterating."""
    p = tmp_path / "x.pcapng"
    p.write_bytes(lie("idb_json", ("queue", "1")))
    with pytest.raises(RecordingError, match=r"x\.pcapng: interface 0 at offset \d+: kind .* queue '1'"):
        with RecordingReader(p) as r:
            list(r.records())


def test_an_exported_pdu_tag_running_past_the_packet_is_refused_in_one_line(tmp_path: Path) -> None:
    """Found by the reader's window campaign: a P2P-direction tag whose 4-byte value the captured bytes
    cut short raised struct.error (a traceback) instead of RecordingError."""
    path = tmp_path / "cut.pcapng"
    with RecordingWriter(path, source="virtio", snaplen=0) as w:
        w.request(F.encode_request("GETATTR", {"getattr": F.make("fuse_getattr_in")}, unique=1, nodeid=1), queue=1)
    data = bytearray(path.read_bytes())
    tag = struct.pack(">HH", fmt.EXP_PDU_TAG_P2P_DIRECTION, 4)
    at = data.index(tag) + 4 + 2  # two bytes into the tag's value
    epb = data.rindex(struct.pack("<I", fmt.BT_EPB), 0, at)
    caplen_at = epb + 8 + 12  # block type, total length, then iface, ts_hi, ts_lo, captured length
    struct.pack_into("<I", data, caplen_at, at - (epb + 28))  # the captured bytes end inside the value
    path.write_bytes(bytes(data))
    with pytest.raises(RecordingError, match="exported PDU") as e, RecordingReader(path) as r:
        list(r)
    assert "\n" not in str(e.value)


def test_a_foreign_pcapng_names_its_writer_on_one_line(tmp_path: Path) -> None:
    """Found by the reader's 1M campaign: the refusal of a pcapng without the fsinspect option quoted the
    file's own shb_userappl, so a newline in it (a flipped byte) split the one-line error."""
    appl = b"evil\napp 1.0"
    opt = struct.pack("<HH", fmt.SHB_USERAPPL, len(appl)) + appl + b"\0" * (-len(appl) % 4) + struct.pack("<HH", 0, 0)
    body = struct.pack("<IHHq", fmt.BYTE_ORDER_MAGIC, fmt.PCAPNG_MAJOR, 0, -1) + opt
    total = 12 + len(body)
    (tmp_path / "foreign.pcapng").write_bytes(struct.pack("<II", fmt.BT_SHB, total) + body + struct.pack("<I", total))
    with pytest.raises(RecordingError, match="not an fsinspect recording") as e:
        RecordingReader(tmp_path / "foreign.pcapng")
    assert "\n" not in str(e.value) and "evil\\napp 1.0" in str(e.value)
