"""`fsinspect guest`: build the test-bed guest and boot it against a vhost-user-fs backend."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from .. import privfile
from ..errors import UserError
from ..guest import build as gbuild
from ..guest import launcher, share
from ..guest.console import Event, GuestResult


def register(sub: Any) -> None:
    p = sub.add_parser("guest", help="build and boot the test-bed guest (Debian kernel + busybox, QEMU)",
                       description="A real Linux guest for virtio-fs testing: a Debian cloud kernel and a "
                                   "busybox initramfs, booted under QEMU against any vhost-user-fs socket.")
    gsub = p.add_subparsers(dest="guest_command", metavar="ACTION")
    gsub.required = True

    b = gsub.add_parser("build", help="fetch the kernel and build the initramfs (cached; idempotent)")
    b.add_argument("--force", action="store_true", help="re-download and rebuild even when cached")
    b.add_argument("-q", "--quiet", action="store_true", help="print only the result")
    b.add_argument("--package", metavar="PKG",
                   help="kernel ABI package to use, e.g. linux-image-6.1.0-56-cloud-amd64 (default: what "
                        "`apt-cache depends linux-image-cloud-amd64` names)")
    b.set_defaults(func=run_build)

    r = gsub.add_parser("run", help="boot the guest against a backend and run a workload",
                        description="Boot the guest, mount virtio-fs TAG at /mnt, run WORKLOAD and report "
                                    f"per-step results.  Workloads: {', '.join(gbuild.workload_names())}.")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--socket", metavar="PATH", help="vhost-user-fs socket of a running backend")
    src.add_argument("--backend", choices=["virtiofsd"],
                     help="start this backend (the C virtiofsd from QEMU 7.2) for the run")
    r.add_argument("--backend-pid", type=int, action="append", default=[], metavar="PID",
                   help="with --socket: a backend process to watch (its exit means backend lost)")
    r.add_argument("--shared-dir", metavar="DIR",
                   help="with --backend: directory to share (default: a temporary share with known files "
                        "and tmpfs submounts at sub/ and sub/inner/; needs root)")
    r.add_argument("--no-announce-submounts", action="store_true",
                   help="with --backend virtiofsd: leave out -o announce_submounts")
    r.add_argument("--cache", choices=["auto", "always", "none"], default="auto",
                   help="with --backend virtiofsd: cache mode (default auto)")
    r.add_argument("--no-xattr", action="store_true", help="with --backend virtiofsd: no -o xattr")
    r.add_argument("--tag", default="myfs", help="virtio-fs tag (default myfs)")
    r.add_argument("--workload", "-w", default="smoke",
                   help="workload, or several separated by commas, run in one boot (default smoke)")
    r.add_argument("--timeout", type=float, default=120.0, help="seconds before QEMU is killed (default 120)")
    r.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                   help="workload parameter, e.g. n=500 (storm), io_mb=16, seconds=20 (hold), xattr=1")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.add_argument("--console", metavar="FILE", help="also save the raw serial console here")
    r.set_defaults(func=run_run)


def _progress(msg: str) -> None:
    print(f"guest build: {msg}", file=sys.stderr, flush=True)


def _image(quiet: bool = True) -> gbuild.GuestImage:
    try:
        return gbuild.build(progress=None if quiet else _progress)
    except gbuild.BuildError as e:
        raise UserError(str(e), status=1) from None


def run_build(args: argparse.Namespace) -> int:
    try:
        img = gbuild.build(progress=None if args.quiet else _progress, force=args.force, package=args.package)
    except gbuild.BuildError as e:
        raise UserError(str(e), status=1) from None
    print(f"kernel {img.kernel_version}: {img.kernel}")
    print(f"initramfs: {img.initramfs}")
    print(f"modules: {' '.join(img.modules)}")
    return 0


def _params(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise UserError(f"--param {item!r}: expected KEY=VALUE")
        out[k] = v
    return out


class _Live:
    """Prints each step as it ends, so a long run shows progress."""

    def __init__(self) -> None:
        self.begin: dict[str, float] = {}

    def __call__(self, ev: Event) -> None:
        a = ev.args()
        if ev.kind == "mounted":
            print(f"  mounted at guest uptime {a[0]} s", flush=True)
        elif ev.kind == "step-begin":
            self.begin[a[0]] = float(a[1])
        elif ev.kind == "step-end":
            dur = float(a[-1]) - self.begin.get(a[0], float(a[-1]))
            rc = a[1].removeprefix("rc=")
            print(f"  {a[0]:<22} {dur:7.2f} s  {'ok' if rc == '0' else 'FAILED rc=' + rc}", flush=True)
        elif ev.kind == "step-skip":
            print(f"  {a[0]:<22}    skip    {' '.join(a[1:])}", flush=True)
        elif ev.kind in ("check-fail", "error"):
            print(f"  ! {ev.kind}: {ev.rest}", flush=True)
        elif ev.kind == "tick" and int(a[0]) and len(a) > 1 and float(a[1]) % 5 < 0.2:
            print(f"  hold: {a[0]} iterations", flush=True)


@contextmanager
def _backend(args: argparse.Namespace, stack: ExitStack) -> Iterator[tuple[launcher.BackendFactory, Path | None]]:
    if args.socket:
        yield launcher.socket_backend(args.socket, args.backend_pid), None
        return
    if args.shared_dir:
        root = Path(args.shared_dir).resolve()
        if not root.is_dir():
            raise UserError(f"--shared-dir {root}: not a directory")
    else:
        try:
            root = stack.enter_context(share.make_share()).root
        except share.ShareError as e:
            raise UserError(str(e), status=1) from None

    def factory(work: Path) -> Any:
        return launcher.virtiofsd(root, work, announce_submounts=not args.no_announce_submounts,
                                  cache=args.cache, xattr=not args.no_xattr)
    yield factory, root


def _summary(res: GuestResult, sums: dict[str, tuple[str, str | None]]) -> None:
    print(f"result: {res.status.upper()}  (wall {res.wall_s} s, accel {res.accel}, "
          f"guest mounted at {res.mounted_uptime} s, done at {res.done_uptime} s)")
    if res.st_dev:
        print("st_dev: " + ", ".join(f"{p}={d}" for p, d in res.st_dev.items()))
    if res.virtiofs_mounts:
        print("virtiofs mounts:")
        for m in res.virtiofs_mounts:
            print(f"  {m}")
    for path, (g, h) in sums.items():
        verdict = "match" if g == h else f"MISMATCH (host {h})"
        print(f"checksum {path}: guest {g[:16]}... host {verdict}")
    if res.backend_lost:
        print(f"backend lost after {res.backend_lost_after_s} s: {res.backend_lost_reason}")
    for f in res.check_failures:
        print(f"check failed: {f}")
    for e in res.errors:
        print(f"guest error: {e}")
    if not res.ok and res.qemu_stderr:
        print("QEMU stderr:")
        for line in res.qemu_stderr[-10:]:
            print(f"  | {line}")
    if not res.ok and not res.backend_lost:
        print("console tail:")
        for line in res.console[-15:]:
            print(f"  | {line}")


def run_run(args: argparse.Namespace) -> int:
    params = _params(args.param)
    known = gbuild.workload_names()
    unknown = [w for w in args.workload.split(",") if w not in known]
    if unknown:
        raise UserError(f"unknown workload {', '.join(unknown)} (known: {', '.join(known)})")
    if args.backend and not args.no_xattr:
        params.setdefault("xattr", "1")
    img = _image()
    with ExitStack() as stack, _backend(args, stack) as (factory, host_root):
        if not args.json:
            print(f"booting {img.kernel_version} ({launcher.choose_accel()}), workload {args.workload}, "
                  f"tag {args.tag}", flush=True)
        try:
            res = launcher.run_with_backend(factory, image=img, tag=args.tag, workload=args.workload,
                                            timeout=args.timeout, params=params,
                                            on_event=None if args.json else _Live())
        except launcher.LaunchError as e:
            raise UserError(str(e), status=1) from None
        if args.console:
            privfile.write_file(args.console, "\n".join(res.console) + "\n")  # 0600: the guest's output
        sums = res.verify_sums(host_root) if host_root is not None else {}
        if host_root is not None:
            # The io workload's scratch file: verified now, not worth keeping in the share.
            (host_root / ".fsi-io.bin").unlink(missing_ok=True)
        if args.json:
            d = res.to_json()
            d["host_sums"] = {p: {"guest": g, "host": h, "match": g == h} for p, (g, h) in sums.items()}
            print(json.dumps(d, indent=1))
        else:
            _summary(res, sums)
    return 0 if res.ok and all(g == h for g, h in sums.values()) else 1
