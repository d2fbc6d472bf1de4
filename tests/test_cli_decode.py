"""`fsinspect decode`: real subprocess runs; bad input is one line and a non-zero exit."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dissectors import fuse as F
from dissectors import vhost_user as V


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "fsinspect", *args], input=stdin, capture_output=True,
                          timeout=60, check=False)


def test_decode_hex_request_shows_named_flags() -> None:
    init = F.encode_request("INIT", {"init": F.make("fuse_init_in", major=7, minor=38,
                                                   flags=(1 << 27) | (1 << 30) | 1)}, unique=1)
    r = run("decode", "--hex", init.hex())
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "FUSE request INIT (26)" in out and "flags         = ASYNC_READ|SUBMOUNTS|INIT_EXT" in out


def test_decode_stream_pairs_replies_and_json(tmp_path: Path) -> None:
    req = F.encode_request("LOOKUP", {"name": b"sub"}, unique=7, nodeid=1)
    attr = F.make("fuse_attr", ino=1, mode=0o40755, flags=1)
    rep = F.encode_reply("LOOKUP", {"entry": F.make("fuse_entry_out", nodeid=4, attr=attr)}, unique=7)
    f = tmp_path / "msgs.bin"
    f.write_bytes(req + rep)
    r = run("decode", str(f), "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [x["kind"] for x in lines] == ["request", "reply"]
    assert lines[1]["args"]["entry"]["attr"]["flags_names"] == ["SUBMOUNT"]
    r = run("decode", "-", stdin=req + rep)
    assert r.returncode == 0 and "attr.flags" not in r.stdout.decode()  # tree output, not summary
    assert re.search(r"\n      flags\s+= SUBMOUNT\n", r.stdout.decode())


def test_decode_non_utf8_name_is_escaped() -> None:
    r = run("decode", "--hex", F.encode_request("LOOKUP", {"name": b"a\xffb\n"}, unique=2, nodeid=1).hex())
    assert r.returncode == 0
    assert 'name = "a\\xffb\\x0a"' in r.stdout.decode()


def test_decode_vhost_user() -> None:
    msg = V.encode_message(V.build("SET_VRING_ADDR", V.make("vhost_vring_addr", index=1, descriptor=0x7f0000001000)))
    r = run("decode", "--vhost-user", "--hex", msg.hex())
    assert r.returncode == 0, r.stderr
    assert "SET_VRING_ADDR (9)" in r.stdout.decode() and "descriptor = 0x7f0000001000" in r.stdout.decode()


@pytest.mark.parametrize(
    ("args", "stdin", "needle"),
    [
        (["decode", "--hex", "zz"], None, "not hex"),
        (["decode", "--hex", "abc"], None, "odd number"),
        (["decode", "--hex", F.encode_request("LOOKUP", {"name": b"x"})[:-1].hex()], None, "truncated"),
        (["decode", "--hex", "2800000007000000010000000000000000000000000000000000000000000000000000000000000000"],
         None, "unknown opcode 7"),
        (["decode", "--hex", F.encode_reply("GETATTR", unique=5, error=2).hex()], None, "--reply-to"),
        (["decode", "--reply-to", "NOPE", "--hex", "10000000feffffff0500000000000000"], None, "unknown opcode"),
        (["decode", "/proc/fsinspect-no-such-file"], None, "No such file"),
        (["decode", "-"], b"", "no input"),
        (["decode", "--vhost-user", "--hex", "01000000"], None, "truncated header"),
        (["decode"], None, "required"),
        (["decode", "--bogus", "x"], None, "unrecognized"),
    ],
)
def test_decode_bad_input_is_one_line(args: list[str], stdin: bytes | None, needle: str) -> None:
    r = run(*args, stdin=stdin)
    err = r.stderr.decode()
    assert r.returncode != 0
    assert "Traceback" not in err
    assert needle in err, err
    assert len(err.strip().splitlines()) <= 3  # argparse prints usage + the error line; ours is one line
