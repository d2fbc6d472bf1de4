"""`fsinspect rerun` without a guest: the sample recorded from a real guest, rerun against real back-ends.

recordings/samples/guest-syncfs.pcapng is the test-bed guest's `syncfs` workload through the proxy in
front of the C virtiofsd, on the test bed's share (tmpfs submounts): a fresh C virtiofsd on a fresh such
share must answer every request as recorded.  Bad input ends in one line and status 2, never a hang.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dissectors import fuse as F
from dissectors import vhost_user as V
from dissectors.spec import virtio as vio
from fsinspect.guest import launcher
from fsinspect.guest.share import Share, make_share
from fsinspect.recording.reader import RecordingReader
from fsinspect.recording.writer import RecordingWriter
from fsinspect.rerun.compare import compare
from fsinspect.rerun.remap import Remap

pytestmark = [pytest.mark.root]
SAMPLE = Path(__file__).resolve().parent.parent / "recordings" / "samples" / "guest-syncfs.pcapng"
VIRTIOFSD_CMD = f"{launcher.VIRTIOFSD} --socket-path={{socket}} -o source={{shared_dir}},announce_submounts,xattr"
DAEMON_CMD = (f"{sys.executable} -m fsinspect daemon --socket-path={{socket}} -o source={{shared_dir}} --xattr "
              "--log-level warning")


def rerun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsinspect", "rerun", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def wait_socket(path: Path, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Wait for a back-end's socket file, its process staying alive meanwhile (no probe connection: the C
    virtiofsd serves one front-end and exits when it hangs up)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the back-end exited with status {proc.returncode} before listening"
        assert time.monotonic() < deadline, f"the back-end never created its socket {path}"
        time.sleep(0.02)

@pytest.fixture
def share() -> Iterator[Share]:
    with make_share() as s:
        yield s


def summary(p: subprocess.CompletedProcess[str]) -> dict[str, object]:
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert lines and lines[-1]["type"] == "summary", p.stdout + p.stderr
    return lines[-1]


def test_rerun_against_fresh_c_virtiofsd_is_identical(share: Share) -> None:
    p = rerun(str(SAMPLE), "--backend-cmd", VIRTIOFSD_CMD, "--shared-dir", str(share.root), "--allow-snapped",
              "--format", "jsonl")
    s = summary(p)
    assert p.returncode == 0, p.stdout + p.stderr
    assert s["differing"] == 0 and s["unanswered"] == 0
    assert s["compared"] == s["answered"] == 69 and s["sent"] == 73  # 4 FORGETs get no reply
    assert s["max_in_flight"] >= s["recorded_max_in_flight"] >= 1  # type: ignore[operator]


def test_rerun_at_recorded_speed_keeps_the_timing(share: Share) -> None:
    from fsinspect.rerun.plan import load

    plan = load(str(SAMPLE), allow_snapped=True)
    span = ((plan.exchanges[-1].req_ts or 0) - (plan.exchanges[0].req_ts or 0)) / 1e9
    assert span > 0.3
    fast = summary(rerun(str(SAMPLE), "--backend-cmd", VIRTIOFSD_CMD, "--shared-dir", str(share.root),
                         "--allow-snapped", "--format", "jsonl"))
    with make_share() as fresh:
        p = rerun(str(SAMPLE), "--backend-cmd", VIRTIOFSD_CMD, "--shared-dir", str(fresh.root), "--allow-snapped",
                  "--speed", "1x", "--format", "jsonl")
    slow = summary(p)
    assert p.returncode == 0 and slow["differing"] == 0
    assert span * 0.95 <= slow["elapsed_s"] < span + 10  # type: ignore[operator]
    assert fast["elapsed_s"] < span  # type: ignore[operator]


def test_rerun_text_says_the_share_must_be_as_recorded(share: Share) -> None:
    p = rerun(str(SAMPLE), "--backend-cmd", VIRTIOFSD_CMD, "--shared-dir", str(share.root), "--allow-snapped",
              "--bench")
    assert p.returncode == 0, p.stderr
    assert "needs the share as it was when the recording started" in p.stderr
    assert "69 exchanges compared: 69 identical, 0 differing" in p.stdout
    assert "requests/s" in p.stdout and "SYNCFS" in p.stdout  # the --bench table


def test_rerun_against_bundled_daemon_lists_explained_differences(share: Share) -> None:
    p = rerun(str(SAMPLE), "--backend-cmd", DAEMON_CMD, "--shared-dir", str(share.root), "--allow-snapped",
              "--format", "jsonl")
    assert p.returncode == 1, p.stdout + p.stderr
    s = summary(p)
    # The bundled daemon offers EVENT_IDX as the recording's back-end did (no ring detail to go without)
    # and negotiates its own INIT (7.45, locks, SUBMOUNTS); every file system answer is the same.
    assert "VIRTIO_RING_F_EVENT_IDX" not in p.stderr
    assert s["by_op"] == {"INIT": 1}, s
    assert s["unanswered"] == 0


def test_snapped_recording_is_refused_without_allow_snapped(share: Share) -> None:
    p = rerun(str(SAMPLE), "--backend-cmd", VIRTIOFSD_CMD, "--shared-dir", str(share.root))
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "recorded snapped" in p.stderr and "--snaplen 0" in p.stderr


def copy_recording(src: Path, dst: Path, *, drop_init: bool = False, features: int | None = None,
                   skip: frozenset[int] = frozenset(), edit: Callable[[bytes], bytes] | None = None,
                   **writer: Any) -> list[Path]:
    """Rewrite a recording record by record with the codecs (the way a bug report's file gets edited):
    without its INIT, with another SET_FEATURES, without the records at `skip`, with FUSE requests
    rewritten by `edit`, or rotated (`writer`)."""
    with RecordingReader(src) as r, RecordingWriter(dst, snaplen=0, **writer) as w:
        for i, rec in enumerate(r):
            if i in skip or (drop_init and rec.is_fuse and rec.data[4:8] == (26).to_bytes(4, "little")):
                continue
            if rec.is_fuse:
                data = edit(rec.data) if edit is not None and rec.inbound else rec.data
                (w.request if rec.inbound else w.reply)(data, rec.queue, rec.head, rec.ts_ns,
                                                        orig_len=rec.orig_len + len(data) - len(rec.data))
                continue
            data = rec.data
            if features is not None and rec.inbound and V.decode_message(data).name == "SET_FEATURES":
                data = V.encode_message(V.build("SET_FEATURES", V.u64(features)))
            w.control(data, from_frontend=rec.inbound, ts_ns=rec.ts_ns)
        return list(w.paths)


def test_no_init_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "noinit.pcapng"
    copy_recording(SAMPLE, bad, drop_init=True)
    p = rerun(str(bad), "--backend", str(tmp_path / "nobody.sock"))
    assert p.returncode == 2 and "no INIT request" in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_truncated_recording_is_a_clear_error(tmp_path: Path, share: Share) -> None:
    cut = tmp_path / "cut.pcapng"
    data = SAMPLE.read_bytes()
    cut.write_bytes(data[:len(data) * 2 // 3])
    p = rerun(str(cut), "--backend-cmd", VIRTIOFSD_CMD, "--shared-dir", str(share.root), "--allow-snapped")
    assert p.returncode == 2 and "truncated tail" in p.stderr and "--allow-truncated" in p.stderr, p.stderr
    p = rerun(str(cut), "--backend-cmd", VIRTIOFSD_CMD, "--shared-dir", str(share.root), "--allow-snapped",
              "--allow-truncated", "--format", "jsonl")
    assert p.returncode == 0, p.stdout + p.stderr
    assert 0 < summary(p)["compared"] < 69  # type: ignore[operator]


def test_backend_refusing_a_feature_is_a_clear_error(tmp_path: Path, share: Share) -> None:
    edited = tmp_path / "notify.pcapng"
    # VIRTIO_FS_F_NOTIFICATION: the recording claims the device had it; the C virtiofsd offers no such thing.
    feats = (1 << 32) | (1 << 30) | (1 << 28) | vio.VIRTIO_FS_F.by_name()["NOTIFICATION"]
    copy_recording(SAMPLE, edited, features=feats)
    p = rerun(str(edited), "--backend-cmd", VIRTIOFSD_CMD, "--shared-dir", str(share.root), "--allow-snapped")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "does not offer" in p.stderr and "which the recording negotiated" in p.stderr, p.stderr


def test_backend_dying_mid_rerun_is_a_clear_error(share: Share) -> None:
    """The C virtiofsd is killed once it has answered INIT (its -d log says so): one line, status 2."""
    with launcher.short_tmpdir() as work, launcher.virtiofsd(share.root, work, xattr=True,
                                                              extra_args=["-d"]) as be:
        proc = be.processes[0]
        assert be.log_path is not None
        log = be.log_path
        t0 = time.monotonic()
        rr = subprocess.Popen([sys.executable, "-m", "fsinspect", "rerun", str(SAMPLE), "--backend",
                               str(be.socket_path), "--allow-snapped", "--speed", "1x", "--timeout", "5"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        try:
            while "opcode: INIT" not in log.read_text(errors="replace"):
                assert rr.poll() is None and time.monotonic() - t0 < 60, rr.communicate()
                time.sleep(0.01)
            launcher.stop_process(proc)  # type: ignore[arg-type]
            out, err = rr.communicate(timeout=30)
        finally:
            if rr.poll() is None:
                rr.kill()
    assert rr.returncode == 2, out + err
    assert "closed its vhost-user connection" in err, err
    assert err.strip().splitlines()[-1].startswith("fsinspect rerun: ") and "Traceback" not in err


def test_remap_and_compare_keep_what_back_ends_choose_apart() -> None:
    """Nodeids, fhs and cookies are mapped, never compared; volatile attrs count only with strict."""
    look = F.decode_request(F.encode_request("LOOKUP", {"name": b"f"}, unique=5, nodeid=1))

    def entry(nodeid: int, ino: int, mtime: int, flags: int = 0) -> F.Reply:
        attr = F.make("fuse_attr", ino=ino, mode=0o100644, size=3, mtime=mtime, flags=flags)
        raw = F.encode_reply("LOOKUP", {"entry": F.make("fuse_entry_out", nodeid=nodeid, attr=attr)}, unique=5)
        rep = F.decode_reply(raw, look)
        assert isinstance(rep, F.Reply)
        return rep

    old, new = entry(7, 100, 1), entry(42, 900, 2)
    assert compare(old, new) == []
    assert {d.field for d in compare(old, new, strict=True)} == {"entry.attr.ino", "entry.attr.mtime"}
    assert [(d.field, d.a, d.b) for d in compare(old, entry(42, 900, 2, flags=1))] == [("entry.attr.flags", "0", "SUBMOUNT")]
    m = Remap()
    m.learn(look, old, new)
    get = F.decode_request(F.encode_request("GETATTR", {"getattr": F.make("fuse_getattr_in")}, unique=9, nodeid=7))
    out = m.request(get, 77)
    assert (out.nodeid, out.unique, m.unique[9]) == (42, 77, 77)


def test_rerun_record_is_a_recording_that_diffs_equal(tmp_path: Path, share: Share) -> None:
    """--record writes the rerun (control plane included); `fsinspect diff` finds it equal to the original,
    and it reruns by itself (its own negotiation) with no difference either."""
    out = tmp_path / "rerun.pcapng"
    p = rerun(str(SAMPLE), "--backend-cmd", VIRTIOFSD_CMD, "--shared-dir", str(share.root), "--allow-snapped",
              "--record", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    d = subprocess.run([sys.executable, "-m", "fsinspect", "diff", str(SAMPLE), str(out), "--format", "jsonl"],
                       capture_output=True, text=True, timeout=60)
    assert d.returncode == 0, d.stdout + d.stderr
    assert summary(d)["compared"] == 69 and summary(d)["differing"] == 0
    with make_share() as fresh:
        p = rerun(str(out), "--backend-cmd", VIRTIOFSD_CMD, "--shared-dir", str(fresh.root), "--format", "jsonl")
    assert p.returncode == 0 and "no negotiation" not in p.stderr, p.stdout + p.stderr


def test_prepare_share_rebuilds_what_the_recording_proves(tmp_path: Path) -> None:
    """The sample proves the root's mode and two submounts (READDIRPLUS/LOOKUP with FUSE_ATTR_SUBMOUNT):
    they become tmpfs mounts.  What it can't prove (the names it never looked at) shows only as the
    directories' sizes and link counts."""
    root = tmp_path / "share"
    try:
        p = rerun(str(SAMPLE), "--backend-cmd", VIRTIOFSD_CMD, "--prepare-share", str(root), "--allow-snapped",
                  "--format", "jsonl")
        assert os.path.ismount(root / "sub") and os.path.ismount(root / "sub" / "inner")
        assert "2 submounts" in p.stderr, p.stderr
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    finally:
        for m in (root / "sub" / "inner", root / "sub"):
            subprocess.run(["umount", str(m)], check=False, capture_output=True)
    s = summary(p)
    assert p.returncode == 1 and s["unanswered"] == 0
    assert set(s["by_field"]) <= {"GETATTR attr_out.attr.size", "GETATTR attr_out.attr.nlink",  # type: ignore[arg-type]
                                  "LOOKUP entry.attr.size", "LOOKUP entry.attr.nlink"}, s
    p = rerun(str(SAMPLE), "--backend", "/nonexistent.sock", "--prepare-share", str(root), "--allow-snapped")
    assert p.returncode == 2 and "not an empty directory" in p.stderr


def test_diff_of_a_recording_with_itself_minus_a_request(tmp_path: Path) -> None:
    """A request only one recording has is reported as such, and the rest still aligns."""
    with RecordingReader(SAMPLE) as r:
        recs = list(r)
    getattr_op = (3).to_bytes(4, "little")
    victim = next(i for i, rec in enumerate(recs) if rec.is_fuse and rec.inbound and rec.data[4:8] == getattr_op)
    answer = next(i for i in range(victim + 1, len(recs))
                  if recs[i].is_fuse and not recs[i].inbound and recs[i].data[8:16] == recs[victim].data[8:16])
    b = tmp_path / "b.pcapng"
    copy_recording(SAMPLE, b, skip=frozenset({victim, answer}))
    d = subprocess.run([sys.executable, "-m", "fsinspect", "diff", str(SAMPLE), str(b), "--format", "jsonl"],
                       capture_output=True, text=True, timeout=60)
    s = summary(d)
    assert d.returncode == 1 and s["only_a"] == 1 and s["only_b"] == 0 and s["differing"] == 0, d.stdout
    assert s["compared"] == 68


def test_rerun_reads_a_rotated_recording(tmp_path: Path, share: Share) -> None:
    """The recording rewritten in parts of about 16 KiB (as `--rotate-mb` makes them): the rerun reads them
    all from the first one's name and replays the same session."""
    written = copy_recording(SAMPLE, tmp_path / "rot.pcapng", rotate_mb=16 / 1024)
    assert len(written) > 1
    p = rerun(str(written[0]), "--backend-cmd", VIRTIOFSD_CMD, "--shared-dir", str(share.root), "--allow-snapped",
              "--format", "jsonl")
    assert p.returncode == 0, p.stdout + p.stderr
    assert summary(p)["compared"] == 69


def inflate_forgets(raw: bytes) -> bytes:
    """A FORGET giving back 3 more lookups than the recorded back-end granted (a recording whose counts
    exceed what the back-end under test grants, as when its LOOKUPs fail or map differently)."""
    try:
        req = F.decode_request(raw)
    except Exception:
        return raw
    if req.opname != "FORGET":
        return raw
    args = {"forget": req.args["forget"]._replace(nlookup=req.args["forget"].nlookup + 3)}
    return F.encode_request_obj(F.Request(req.header, req.op, args, req.ext))


def test_forgets_beyond_the_back_ends_grants_are_clamped_not_sent(tmp_path: Path, share: Share) -> None:
    """Replayed verbatim, these FORGETs abort the C virtiofsd (`inode->nlookup >= n` in unref_inode): the
    rerun gives back only what this back-end granted, says so, and the back-end lives to exit cleanly."""
    rec = tmp_path / "inflated.pcapng"
    copy_recording(SAMPLE, rec, edit=inflate_forgets)
    with launcher.short_tmpdir("fsi-forget-") as work:
        sock = work / "vfsd.sock"
        cmd = VIRTIOFSD_CMD.format(socket=sock, shared_dir=share.root).split()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_socket(sock, proc)
            p = rerun(str(rec), "--backend", str(sock), "--allow-snapped", "--format", "jsonl")
            _, err = proc.communicate(timeout=20)  # the C virtiofsd exits when its front-end hangs up
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0 and b"Assertion" not in err, err.decode(errors="replace")[-500:]
    s = summary(p)
    assert p.returncode == 0 and s["differing"] == 0 and s["unanswered"] == 0, p.stdout + p.stderr
    assert s["compared"] == s["answered"] == 69 and s["sent"] == 73  # every FORGET still went, clamped
    notes = s["notes"]
    assert isinstance(notes, list) and len(notes) == 5, notes
    assert notes[0].startswith("4 FORGET/BATCH_FORGET entries gave back more lookups than this back-end "
                               "granted (12 nlookup in all): clamped")
    assert all("nlookup 4 recorded, the back-end granted 1; sent 1" in n for n in notes[1:]), notes
    text = rerun(str(rec), "--backend-cmd", VIRTIOFSD_CMD, "--shared-dir", str(share.root), "--allow-snapped")
    assert "note: 4 FORGET/BATCH_FORGET entries" in text.stdout, text.stdout + text.stderr



def test_lookup_accounting_clamps_forgets_to_the_grants() -> None:
    """Every reply the kernel counts grants one lookup per nonzero nodeid (the spec's GRANTS_LOOKUP);
    forgets give back at most that, node by node, and say what they withheld."""
    from dissectors.spec import fuse as fspec
    from fsinspect.rerun.lookups import Lookups

    for name in fspec.GRANTS_LOOKUP:  # the table names exactly the replies that carry entries
        parts = {p.kind for p in F.spec.OPCODE_BY_NAME[name].reply or ()}
        assert "entry" in {p.name for p in F.spec.OPCODE_BY_NAME[name].reply or ()} or "direntplus" in parts
    look = F.decode_request(F.encode_request("LOOKUP", {"name": b"f"}, unique=5, nodeid=1))

    def reply(op: str, args: dict[str, Any], req: F.Request, error: int = 0) -> Any:
        return F.decode_reply(F.encode_reply(op, args, unique=req.unique, error=error), req)

    def entry(nodeid: int) -> dict[str, Any]:
        return {"entry": F.make("fuse_entry_out", nodeid=nodeid)}

    rdp = F.decode_request(F.encode_request("READDIRPLUS", {"read": F.make("fuse_read_in", size=4096)}, unique=6,
                                            nodeid=1))
    plus = [(F.make("fuse_direntplus", entry_out=F.make("fuse_entry_out", nodeid=n)), nm)
            for n, nm in ((1, b"."), (0, b".."), (9, b"x"))]
    lk = Lookups()
    lk.grant("LOOKUP", reply("LOOKUP", entry(7), look))
    lk.grant("LOOKUP", reply("LOOKUP", entry(7), look))
    lk.grant("LOOKUP", reply("LOOKUP", entry(0), look))  # a negative entry: no lookup
    lk.grant("LOOKUP", reply("LOOKUP", {}, look, error=-2))  # ENOENT: none either
    lk.grant("GETATTR", reply("LOOKUP", entry(8), look))  # not an op that grants
    lk.grant("READDIRPLUS", reply("READDIRPLUS", {"entries": plus}, rdp))
    assert dict(lk.held) == {7: 2, 1: 1, 9: 1}

    ones = [F.make("fuse_forget_one", nodeid=n, nlookup=c) for n, c in ((7, 5), (9, 1), (11, 2))]
    batch = F.decode_request(F.encode_request("BATCH_FORGET", {"batch": F.make("fuse_batch_forget_in", count=3),
                                                               "forgets": ones}, unique=10))
    out = lk.give_back(batch, "#3 BATCH_FORGET")
    assert out is not None
    again = F.decode_request(F.encode_request_obj(out))  # what goes on the wire is a well-formed message
    assert again.args["batch"].count == 2
    assert [(o.nodeid, o.nlookup) for o in again.args["forgets"]] == [(7, 2), (9, 1)]
    assert lk.adjusted == ["#3 BATCH_FORGET nodeid 7: nlookup 5 recorded, the back-end granted 2; sent 2",
                           "#3 BATCH_FORGET nodeid 11: nlookup 2 recorded, the back-end granted 0; not sent"]
    assert lk.withheld == 5 and dict(lk.held) == {1: 1}

    fg = F.decode_request(F.encode_request("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, nodeid=9))
    assert lk.give_back(fg, "#4 FORGET") is None  # all of node 9 came back already: nothing to send
    root = F.decode_request(F.encode_request("FORGET", {"forget": F.make("fuse_forget_in", nlookup=1)}, nodeid=1))
    # A recorded nodeid the remap never learnt passes unmapped: whatever node of this back-end bears that
    # number is not the recording's, so nothing of it is given back.
    assert lk.give_back(root, "#5 FORGET", lambda _: False) is None
    assert lk.adjusted[-1] == "#5 FORGET nodeid 1: nlookup 1 recorded, a node the recording never mapped to one " \
                              "of this back-end's; not sent"
    assert lk.give_back(root, "#6 FORGET") is root  # within the grants: sent as recorded
    assert lk.note().startswith("4 FORGET/BATCH_FORGET entries gave back more lookups than this back-end granted "
                                "(7 nlookup in all)")


@pytest.mark.parametrize("ending,said", [("exit 3", "the back-end exited with status 3"),
                                         ("kill -SEGV $$", "the back-end was killed by SIGSEGV")])
def test_backend_failing_after_its_last_reply_is_reported(share: Share, ending: str, said: str) -> None:
    """The C virtiofsd answers every request, then its wrapper fails as the session ends: every reply is
    equal, yet the report says the back-end failed, and the status is 1."""
    cmd = f"sh -c '{VIRTIOFSD_CMD} 2>&1; echo goodbye from the back-end >&2; {ending}'"
    p = rerun(str(SAMPLE), "--backend-cmd", cmd, "--shared-dir", str(share.root), "--allow-snapped",
              "--format", "jsonl")
    s = summary(p)
    assert p.returncode == 1 and s["differing"] == 0 and s["unanswered"] == 0, p.stdout + p.stderr
    failed = s["backend_failed"]
    assert isinstance(failed, str) and failed.startswith(said) and "goodbye from the back-end" in failed, failed
    with make_share() as fresh:
        text = rerun(str(SAMPLE), "--backend-cmd", cmd, "--shared-dir", str(fresh.root), "--allow-snapped")
    assert text.returncode == 1 and f"back-end failure: {said}" in text.stdout, text.stdout + text.stderr


def test_backend_that_binds_before_it_listens_is_waited_for(share: Share) -> None:
    """A stale socket file (bound, nobody listening) sits there for a second before virtiofsd replaces it:
    the rerun waits for a connection to succeed, not for the file."""
    stale = f"{sys.executable} -c \"import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])\" {{socket}}"
    cmd = f"sh -c '{stale}; sleep 1; exec {VIRTIOFSD_CMD}'"
    p = rerun(str(SAMPLE), "--backend-cmd", cmd, "--shared-dir", str(share.root), "--allow-snapped",
              "--format", "jsonl")
    s = summary(p)
    assert p.returncode == 0 and s["differing"] == 0 and s["answered"] == 69, p.stdout + p.stderr


def test_backend_that_never_listens_is_a_clear_error_with_its_output(tmp_path: Path) -> None:
    stale = f"{sys.executable} -c \"import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])\" {{socket}}"
    cmd = f"sh -c 'echo warming up the caches >&2; {stale}; sleep 60'"
    t0 = time.monotonic()
    p = rerun(str(SAMPLE), "--backend-cmd", cmd, "--allow-snapped", "--timeout", "2")
    assert p.returncode == 2 and time.monotonic() - t0 < 30, p.stdout + p.stderr
    line = p.stderr.strip().splitlines()[-1]  # (after the plan's warnings)
    assert line.startswith("fsinspect rerun: ") and "Traceback" not in p.stderr, p.stderr
    assert "did not listen on" in line and "within 2 s (connection refused)" in line, line
    assert "warming up the caches" in line, line


def test_destroy_goes_after_the_forgets_sent_before_it(tmp_path: Path, share: Share) -> None:
    """The sample ends FORGET, FORGET (hiprio queue), DESTROY: the guest's forgets were handled first.  Sent
    together, DESTROY could overtake them and the C virtiofsd answered them EIO into no reply buffer
    ("elem too short for out_header" in its log): DESTROY now waits until every chain sent is back."""
    from fsinspect.rerun.front import Front
    from fsinspect.rerun.plan import load
    from fsinspect.rerun.runner import Rerun

    plan = load(str(SAMPLE), allow_snapped=True)
    assert [e.opname for e in plan.exchanges[-3:]] == ["FORGET", "FORGET", "DESTROY"]
    log = tmp_path / "virtiofsd.log"
    with launcher.short_tmpdir("fsi-destroy-") as work:
        sock = work / "vfsd.sock"
        cmd = [*VIRTIOFSD_CMD.format(socket=sock, shared_dir=share.root).split(), "-d"]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        try:
            wait_socket(sock, proc)
            time.sleep(0.1)  # (the socket file appears a moment before virtiofsd listens)
            front = Front(sock, plan.negotiation, max_request=plan.max_request, max_reply=plan.max_reply)
            in_flight_at_destroy: list[int] = []
            submit = front.submit

            def spy(queue: int, raw: bytes, *rest: Any) -> None:
                if F.decode_request(raw).opname == "DESTROY":
                    in_flight_at_destroy.append(front.in_flight())
                submit(queue, raw, *rest)

            front.submit = spy  # type: ignore[method-assign]
            try:
                result = Rerun(plan, front).run()
            finally:
                front.close()
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert result.tally.equal and not result.tally.unanswered
    assert in_flight_at_destroy == [0]
    text = log.read_text(errors="replace")
    assert "opcode: DESTROY" in text and "too short for out_header" not in text, text[-2000:]
