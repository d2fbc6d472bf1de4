"""Sans-I/O parser for the guest's serial console: `@@FSI` marker lines -> events -> a GuestResult.

The console also carries SeaBIOS ANSI noise and kernel messages, sometimes on the same line as a
marker, so a marker is found anywhere in a line and everything before it is ignored.  The line protocol
itself is documented at the top of fsinspect/guest/initramfs/lib.sh.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MARKER = "@@FSI "


@dataclass(frozen=True)
class Event:
    """One marker line: `kind` is the first word, `args` the rest (split on blanks, at most `maxsplit`)."""

    kind: str
    rest: str

    def args(self, maxsplit: int = -1) -> list[str]:
        return self.rest.split(" ", maxsplit) if self.rest else []


@dataclass
class Step:
    name: str
    begin: float
    end: float | None = None
    rc: int | None = None

    @property
    def duration(self) -> float | None:
        """Guest-side seconds, from /proc/uptime (10 ms resolution)."""
        return None if self.end is None else round(self.end - self.begin, 2)


@dataclass(frozen=True)
class StatRecord:
    path: str
    dev: int
    ino: int
    mode: int
    nlink: int
    size: int
    uid: int
    gid: int
    step: str


@dataclass
class GuestResult:
    """Everything one guest run reported.  `status` is ok, fail, timeout, backend_lost or crashed."""

    workload: str
    tag: str
    status: str = "crashed"
    steps: list[Step] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    stats: list[StatRecord] = field(default_factory=list)
    mount_tables: dict[str, list[str]] = field(default_factory=dict)
    entries: list[str] = field(default_factory=list)
    sums: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict[str, str]] = field(default_factory=dict)
    check_failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unmounted: dict[str, int] = field(default_factory=dict)
    ticks: int = 0
    last_tick_uptime: float | None = None
    guest_result: str | None = None
    failed_steps: list[str] = field(default_factory=list)
    boot_uptime: float | None = None
    mounted_uptime: float | None = None
    done_uptime: float | None = None
    kernel: str | None = None
    backend_lost: bool = False
    backend_lost_reason: str | None = None
    backend_lost_after_s: float | None = None
    timed_out: bool = False
    qemu_rc: int | None = None
    qemu_pid: int | None = None
    wall_s: float | None = None
    accel: str | None = None
    qemu_stderr: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(f"no step {name!r} in this run (steps: {[s.name for s in self.steps]})")

    def stats_for(self, step: str) -> dict[str, StatRecord]:
        return {s.path: s for s in self.stats if s.step == step}

    @property
    def st_dev(self) -> dict[str, int]:
        """Path -> st_dev as the guest saw it in the submounts workload (after triggering automounts)."""
        return {p: s.dev for p, s in self.stats_for("submounts-stat").items()}

    @property
    def mounts(self) -> list[str]:
        """The most recent /proc/mounts lines the guest reported (one table per step that reported)."""
        return list(self.mount_tables.values())[-1] if self.mount_tables else []

    @property
    def virtiofs_mounts(self) -> list[str]:
        return [m for m in self.mounts if len(m.split()) > 2 and m.split()[2] == "virtiofs"]

    def verify_sums(self, host_root: Path, guest_root: str = "/mnt") -> dict[str, tuple[str, str | None]]:
        """Guest checksum vs the host file's: path -> (guest, host or None when missing), for every sum."""
        out: dict[str, tuple[str, str | None]] = {}
        for gpath, gsum in self.sums.items():
            rel = gpath.removeprefix(guest_root).lstrip("/")
            hpath = host_root / rel
            hsum = None
            if hpath.is_file():
                h = hashlib.sha256()
                with open(hpath, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                hsum = h.hexdigest()
            out[gpath] = (gsum, hsum)
        return out

    def to_json(self, console: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        for s, sd in zip(self.steps, d["steps"]):
            sd["duration"] = s.duration
        d["st_dev"] = self.st_dev
        d["mounts"] = self.mounts
        d["virtiofs_mounts"] = self.virtiofs_mounts
        if not console:
            d.pop("console")
            if not self.ok:
                d["console_tail"] = self.console[-40:]
        return d


def parse_line(line: str) -> Event | None:
    """The marker in one console line, or None.  Noise before the marker is dropped."""
    i = line.find(MARKER)
    if i < 0:
        return None
    body = line[i + len(MARKER):].rstrip("\r\n").strip()
    kind, _, rest = body.partition(" ")
    return Event(kind, rest) if kind else None


def _kv(tokens: list[str]) -> dict[str, str]:
    return dict(t.split("=", 1) for t in tokens if "=" in t)


def _float(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


class ConsoleParser:
    """Feed raw console bytes; complete lines become events applied to `result`."""

    def __init__(self, result: GuestResult) -> None:
        self.result = result
        self._buf = b""
        self._current: str = ""

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return [e for raw in lines if (e := self.line(raw.decode("utf-8", "replace"))) is not None]

    def close(self) -> list[Event]:
        rest, self._buf = self._buf, b""
        e = self.line(rest.decode("utf-8", "replace")) if rest else None
        return [e] if e else []

    def line(self, text: str) -> Event | None:
        text = text.rstrip("\r")
        self.result.console.append(text)
        ev = parse_line(text)
        if ev is not None:
            try:
                self.apply(ev)
            except (ValueError, KeyError, IndexError) as e:
                # A garbled marker (say, interleaved with a kernel message) must not end the run.
                self.result.errors.append(f"unparseable marker ({type(e).__name__}: {e}): {text}")
        return ev

    def apply(self, ev: Event) -> None:
        r = self.result
        k = ev.kind
        if k == "step-begin":
            a = ev.args()
            self._current = a[0]
            begin = _float(a[1]) if len(a) > 1 else None
            r.steps.append(Step(a[0], begin if begin is not None else 0.0))
        elif k == "step-end":
            a = ev.args()
            step = next((s for s in reversed(r.steps) if s.name == a[0] and s.end is None), None)
            if step is None:
                step = Step(a[0], 0.0)
                r.steps.append(step)
            step.rc = int(_kv(a).get("rc", "-1"))
            step.end = _float(a[-1]) if len(a) > 2 else None
            self._current = ""
        elif k == "step-skip":
            name, _, reason = ev.rest.partition(" ")
            r.skipped[name] = reason
        elif k == "stat":
            a = ev.args(7)
            kv = _kv(a[:7])
            r.stats.append(StatRecord(path=a[7] if len(a) > 7 else "", dev=int(kv["dev"]),
                                      ino=int(kv["ino"]), mode=int(kv["mode"], 16), nlink=int(kv["nlink"]),
                                      size=int(kv["size"]), uid=int(kv["uid"]), gid=int(kv["gid"]),
                                      step=self._current))
        elif k == "mount":
            r.mount_tables.setdefault(self._current, []).append(ev.rest)
        elif k == "entry":
            r.entries.append(ev.rest)
        elif k == "sum":
            digest, _, path = ev.rest.partition(" ")
            r.sums[path] = digest
        elif k == "metric":
            name, _, rest = ev.rest.partition(" ")
            r.metrics.setdefault(name, {}).update(_kv(rest.split()))
        elif k == "check-fail":
            r.check_failures.append(ev.rest)
        elif k == "error":
            r.errors.append(ev.rest)
        elif k == "tick":
            a = ev.args()
            r.ticks += 1
            r.last_tick_uptime = _float(a[1]) if len(a) > 1 else None
        elif k == "boot":
            a = ev.args()
            r.boot_uptime = _float(a[0]) if a else None
            r.kernel = _kv(a).get("kernel")
        elif k == "mounted":
            a = ev.args()
            r.mounted_uptime = _float(a[0]) if a else None
        elif k == "result":
            a = ev.args()
            r.guest_result = a[0] if a else None
            failed = _kv(a).get("failed", "")
            r.failed_steps = [s for s in failed.split(",") if s]
        elif k == "unmounted":
            a = ev.args()
            r.unmounted[a[0]] = int(_kv(a).get("rc", "-1"))
        elif k == "done":
            a = ev.args()
            r.done_uptime = _float(a[0]) if a else None
