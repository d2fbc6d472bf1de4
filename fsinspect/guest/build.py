"""Build the test-bed guest: a Debian cloud kernel plus a busybox initramfs, cached per kernel version.

The kernel is never installed on the host: the current `linux-image-*-cloud-amd64` ABI package is resolved
with apt, fetched with `apt-get download` and unpacked with `dpkg-deb -x`.  Only the kernel image and the
module chain virtio-fs needs are kept.  The .deb ships no modules.dep (depmod runs in postinst), so the
chain is resolved from each module's modinfo `depends=` field.

The initramfs is written by a small newc writer here rather than by cpio: the host has no cpio, and a
writer of our own can put /dev/console (c 5 1) into the archive without mknod privileges.  Its cache key
is a hash over everything that goes into it, so editing a workload script builds a new one and nothing
else does; each key has its own file (initramfs-KEY.gz), so checkouts with different workloads sharing the
cache never boot one another's.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

META_PACKAGE = "linux-image-cloud-amd64"
# Modules the guest needs; their dependencies are pulled in from modinfo.
ROOT_MODULES = ("virtiofs", "virtio_pci")
BUSYBOX = "/bin/busybox"
# Dynamically linked host tools copied in with their libraries (busybox has no xattr applets; busybox's
# `sync -f` ignores what syncfs(2) returns, GNU sync reports it: the debugger's SYNCFS test needs that).
EXTRA_TOOLS = ("/usr/bin/setfattr", "/usr/bin/getfattr", "/usr/bin/sync")
FORMAT_VERSION = 1

Progress = Callable[[str], None]


class BuildError(Exception):
    """The guest could not be built; the message names the command that failed."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel and initramfs paths, ready for QEMU's -kernel/-initrd."""

    kernel_version: str
    kernel: Path
    initramfs: Path
    modules: tuple[str, ...]
    directory: Path


def cache_root() -> Path:
    """~/.cache/fsinspect/guest, honouring XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fsinspect" / "guest"


def _run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    """Run a host tool; a failure becomes a BuildError that shows the command and its stderr."""
    try:
        p = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise BuildError(f"`{' '.join(cmd)}` failed: {e.strerror}: {cmd[0]}") from None
    if p.returncode != 0:
        err = (p.stderr.strip() or p.stdout.strip()).splitlines()
        tail = "; ".join(err[-3:]) if err else f"exit status {p.returncode}"
        raise BuildError(f"`{' '.join(cmd)}` failed (exit {p.returncode}): {tail}")
    return p.stdout


def parse_depends_output(text: str, meta: str = META_PACKAGE) -> str:
    """The ABI package named by `apt-cache depends <meta>`, e.g. linux-image-6.1.0-56-cloud-amd64."""
    for line in text.splitlines():
        m = re.match(r"\s*\|?Depends:\s+(linux-image-\S+)", line)
        if m and m.group(1) != meta and not m.group(1).endswith("-unsigned"):
            return m.group(1)
    raise BuildError(f"`apt-cache depends {meta}` names no linux-image ABI package "
                     f"(is `apt-get update` needed?)")


APT_LISTS = Path("/var/lib/apt/lists")


def resolve_kernel_package(cache_dir: Path | None = None) -> str:
    """Resolve the current ABI package; the suffix moves with security updates, so never hard-code it.

    `apt-cache depends` costs about 0.6 s here, so its answer is remembered until the apt lists change
    (apt-get update renames files into the lists directory, which moves its mtime).
    """
    memo = (cache_dir or cache_root()) / "resolved.json"
    try:
        stamp = APT_LISTS.stat().st_mtime_ns
    except OSError:
        stamp = -1
    with suppress(OSError, ValueError, KeyError):
        d = json.loads(memo.read_text())
        if d["lists_mtime_ns"] == stamp and d["meta"] == META_PACKAGE:
            return str(d["package"])
    package = parse_depends_output(_run(["apt-cache", "depends", META_PACKAGE]))
    with suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"meta": META_PACKAGE, "package": package, "lists_mtime_ns": stamp}))
    return package


def kernel_version_of(package: str) -> str:
    """linux-image-6.1.0-56-cloud-amd64 -> 6.1.0-56-cloud-amd64."""
    return package.removeprefix("linux-image-")


def modinfo(ko: bytes) -> dict[str, list[str]]:
    """The key=value strings of a module's .modinfo section (NUL separated, so a plain scan finds them)."""
    out: dict[str, list[str]] = {}
    for chunk in ko.split(b"\0"):
        m = re.fullmatch(rb"(name|depends|vermagic)=([ -~]*)", chunk)
        if m:
            out.setdefault(m.group(1).decode(), []).append(m.group(2).decode())
    return out


def module_name(path: Path, info: dict[str, list[str]]) -> str:
    names = info.get("name")
    return names[0] if names else path.name.removesuffix(".ko").replace("-", "_")


def resolve_module_chain(index: dict[str, Path], roots: Iterable[str] = ROOT_MODULES) -> list[str]:
    """Load order for `roots`: a depth-first topological sort over the modinfo depends= graph."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise BuildError(f"module dependency cycle at {name}")
        path = index.get(name)
        if path is None:
            raise BuildError(f"kernel package has no module {name}.ko (is it built in or missing?)")
        visiting.add(name)
        deps = modinfo(path.read_bytes()).get("depends", [""])[0]
        for dep in filter(None, deps.split(",")):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for r in roots:
        visit(r)
    return order


def index_modules(tree: Path) -> dict[str, Path]:
    """Map module name -> .ko path for every module under an unpacked lib/modules tree."""
    index: dict[str, Path] = {}
    for ko in tree.rglob("*.ko"):
        index[ko.name.removesuffix(".ko").replace("-", "_")] = ko
    return index


# ---------------------------------------------------------------------------------------------------------
# newc (SVR4 "070701") archive writer


class Newc:
    """A minimal newc cpio writer: directories, regular files, symlinks and device nodes."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1
        self.names: list[str] = []

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        bname = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(bname), 0)
        self._ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._buf.write(hdr + bname)
        self._buf.write(b"\0" * (-(len(hdr) + len(bname)) % 4))
        self._buf.write(data)
        self._buf.write(b"\0" * (-len(data) % 4))
        if name != "TRAILER!!!":
            self.names.append(name)

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        data = self._buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


def _guest_files() -> dict[str, bytes]:
    """The project's own guest files: /init, /fsi/lib.sh and /fsi/workloads/*.sh (package data)."""
    pkg = resources.files("fsinspect.guest")
    files = {
        "init": pkg.joinpath("initramfs", "init").read_bytes(),
        "fsi/lib.sh": pkg.joinpath("initramfs", "lib.sh").read_bytes(),
    }
    wl = pkg.joinpath("workloads")
    for entry in sorted(wl.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sh"):
            files[f"fsi/workloads/{entry.name}"] = entry.read_bytes()
    return files


def workload_names() -> list[str]:
    """Workloads shipped in the initramfs (file stem = workload name)."""
    return sorted(Path(k).stem for k in _guest_files() if k.startswith("fsi/workloads/"))


def _ldd_closure(binary: str) -> list[str]:
    """The binary plus the shared objects ldd lists for it (absolute paths as the loader will look)."""
    out = _run(["ldd", binary])
    paths = [binary]
    for line in out.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            paths.append(m.group(1))
    return paths


def _extra_tool_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for tool in EXTRA_TOOLS:
        if os.path.exists(tool):
            for p in _ldd_closure(tool):
                files[p.lstrip("/")] = Path(os.path.realpath(p))
    return files


def build_initramfs(modules: Sequence[tuple[str, Path]], kernel_version: str) -> bytes:
    """The gzip'd newc archive: busybox, /init, workloads, the module chain and /dev/console."""
    arc = Newc()
    extra = _extra_tool_files()
    dirs = {"bin", "sbin", "dev", "proc", "sys", "mnt", "tmp", "fsi", "fsi/workloads", "lib",
            "lib/modules", "usr", "usr/bin", "usr/sbin", "root"}
    for path in extra:
        parent = os.path.dirname(path)
        while parent:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    for d in sorted(dirs):
        arc.directory(d)
    arc.chardev("dev/console", 5, 1)
    arc.chardev("dev/null", 1, 3, 0o666)
    arc.file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    arc.symlink("bin/sh", "busybox")
    for name, data in _guest_files().items():
        arc.file(name, data, 0o755 if name == "init" or name.endswith(".sh") else 0o644)
    for mod, ko in modules:
        arc.file(f"lib/modules/{mod}.ko", ko.read_bytes())
    arc.file("fsi/modules.order", "".join(f"{n}\n" for n, _ in modules).encode())
    arc.file("fsi/kernel-version", f"{kernel_version}\n".encode())
    for dest, src in sorted(extra.items()):
        arc.file(dest, src.read_bytes(), 0o755)
    return gzip.compress(arc.finish(), compresslevel=6, mtime=0)


def _initramfs_key(modules: Sequence[tuple[str, Path]]) -> str:
    h = hashlib.sha256(f"fsinspect-initramfs-v{FORMAT_VERSION}\n".encode())
    for name, data in sorted(_guest_files().items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    h.update(hashlib.sha256(Path(BUSYBOX).read_bytes()).digest())
    for name, path in modules:
        st = path.stat()
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    for dest, src in sorted(_extra_tool_files().items()):
        st = src.stat()
        h.update(f"{dest}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _download(package: str, dest: Path, progress: Progress) -> Path:
    """`apt-get download` the package; with stale lists (404) refresh them once when root, then retry."""
    cmd = ["apt-get", "download", "-q", package]
    progress(f"fetching {package} ({' '.join(cmd)})")
    try:
        _run(cmd, cwd=dest)
    except BuildError as e:
        # Only a fetch failure (stale lists -> 404) is worth an update; an unknown package is not.
        if os.geteuid() != 0 or not re.search(r"Failed to fetch|404|Hash Sum mismatch", str(e)):
            raise
        progress("download failed; refreshing package lists (apt-get update) and retrying")
        try:
            _run(["apt-get", "update", "-qq"])
        except BuildError as e2:
            raise BuildError(f"{e}; then {e2} (offline?)") from None
        _run(cmd, cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise BuildError(f"`{' '.join(cmd)}` produced no .deb in {dest}")
    return debs[0]


def _fetch_kernel(package: str, kdir: Path, progress: Progress) -> None:
    """Download and unpack the -unsigned kernel package, keeping vmlinuz and the module chain."""
    kver = kernel_version_of(package)
    kdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=kdir) as tmp:
        t = Path(tmp)
        os.chmod(t, 0o755)  # apt's _apt sandbox user must be able to write here
        deb = _download(f"{package}-unsigned", t, progress)
        progress(f"unpacking {deb.name} (dpkg-deb -x)")
        root = t / "root"
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        vmlinuz = root / "boot" / f"vmlinuz-{kver}"
        if not vmlinuz.exists():
            raise BuildError(f"{deb.name} has no boot/vmlinuz-{kver}")
        mods = root / "lib" / "modules" / kver
        if not mods.is_dir():
            mods = root / "usr" / "lib" / "modules" / kver
        index = index_modules(mods)
        chain = resolve_module_chain(index)
        progress(f"module chain: {' '.join(chain)}")
        mdir = kdir / "modules"
        if mdir.exists():
            shutil.rmtree(mdir)
        mdir.mkdir()
        for name in chain:
            shutil.copyfile(index[name], mdir / f"{name}.ko")
        (mdir / "order").write_text("".join(f"{n}\n" for n in chain))
        shutil.copyfile(vmlinuz, kdir / "vmlinuz")
        # Written last: its presence means the kernel part of the cache is complete.
        (kdir / "kernel.json").write_text(json.dumps(
            {"package": package, "kernel_version": kver, "modules": chain, "deb": deb.name}, indent=1))


def build(progress: Progress | None = None, force: bool = False, cache_dir: Path | None = None,
          package: str | None = None) -> GuestImage:
    """Build (or reuse) the guest for the current cloud kernel.  A cached build returns in well under 1 s."""
    say: Progress = progress or (lambda _msg: None)
    for tool in ("apt-cache", "apt-get", "dpkg-deb", BUSYBOX):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} not found (Debian/Ubuntu host with busybox-static needed)")
    if package is None:
        say(f"resolving kernel package (apt-cache depends {META_PACKAGE})")
        package = resolve_kernel_package(cache_dir)
    kver = kernel_version_of(package)
    kdir = (cache_dir or cache_root()) / kver
    kdir.mkdir(parents=True, exist_ok=True)
    # Several test sessions may build at once (shared machine, parallel CI jobs): one builder at a time.
    with open(kdir.parent / f".{kver}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(package, kver, kdir, say, force)


def _build_locked(package: str, kver: str, kdir: Path, say: Progress, force: bool) -> GuestImage:
    if force or not (kdir / "kernel.json").exists() or not (kdir / "vmlinuz").exists():
        _fetch_kernel(package, kdir, say)
    else:
        say(f"kernel {kver}: cached in {kdir}")
    chain = [n for n in (kdir / "modules" / "order").read_text().split() if n]
    modules = [(n, kdir / "modules" / f"{n}.ko") for n in chain]
    key = _initramfs_key(modules)
    # One file per content key: checkouts with different workloads (worktrees, branches) sharing the cache
    # each keep their own initramfs instead of overwriting one another's between build and boot.
    initrd = kdir / f"initramfs-{key[:16]}.gz"
    if force or not initrd.exists():
        say("building initramfs (busybox, /init, workloads, modules, /dev/console)")
        data = build_initramfs(modules, kver)
        fd, tmp = tempfile.mkstemp(prefix=".initramfs-", dir=kdir)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, initrd)
        say(f"initramfs: {initrd} ({len(data) / 1e6:.1f} MB)")
        _prune_initramfs(kdir, keep=initrd)
    else:
        say(f"initramfs: cached ({initrd})")
        os.utime(initrd)  # recently used: pruned last
    return GuestImage(kver, kdir / "vmlinuz", initrd, tuple(chain), kdir)


INITRAMFS_KEEP = 8  # initramfs variants kept per kernel (least recently used ones go, never a fresh one)
INITRAMFS_MIN_AGE = 3600.0  # seconds: a variant used this recently may be booting right now


def _prune_initramfs(kdir: Path, keep: Path) -> None:
    old = sorted((p for p in kdir.glob("initramfs-*.gz") if p != keep), key=lambda p: p.stat().st_mtime,
                 reverse=True)
    now = time.time()
    for p in old[INITRAMFS_KEEP - 1:]:
        if now - p.stat().st_mtime > INITRAMFS_MIN_AGE:
            p.unlink(missing_ok=True)
    for legacy in (kdir / "initramfs.gz", kdir / "initramfs.key"):  # the single file of earlier versions
        if legacy.exists() and now - legacy.stat().st_mtime > INITRAMFS_MIN_AGE:
            legacy.unlink(missing_ok=True)
