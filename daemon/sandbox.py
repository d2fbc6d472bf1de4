"""The daemon's sandbox (`--sandbox namespace|chroot|none`): the second wall behind the name checks.

The passthrough code already resolves every guest name relative to a directory fd and refuses '..' at
the root; the sandbox makes a slip in that code harmless, as the C and Rust virtiofsd do:

- namespace: a private mount namespace (and network namespace), the shared dir bind-mounted on itself
  and made the root with pivot_root, the old root detached (virtiofsd's setup_mounts).  Nothing else
  of the host's file tree exists any more: '..' of the root is the root, an absolute symlink lands
  inside the share, no other host mount can be reached.
- chroot: chroot into the shared dir (for hosts where namespaces are not allowed).  The host's mount
  table stays, but only what is under the shared dir can be named.
- none: no confinement beyond the name checks.

Every level but none then drops every capability passthrough does not need (CAP_SYS_ADMIN, the
chroot and ptrace ones among them, so the confinement cannot be undone or stepped around through
/proc/PID/root), sets no_new_privs and loads a seccomp allowlist (ALLOWED; --seccomp).

It confines the calling thread and every thread it starts afterwards: mount namespaces, roots and
capabilities are per-thread in Linux, and the threads that read the guest's bytes (the vhost-user and
/dev/fuse readers, the engine's pool) are all started after it.  The main thread stays outside: it
only waits for signals, then unmounts (standalone), writes --summary-json and removes sockets, which
all need the host's paths.  Files and sockets opened before the switch keep working (an fd does not
care), so the recording, the control socket and the vhost-user connection are unaffected.  procfs
(for /proc/self/fd) is no longer in the file tree, so it becomes the confined threads' working
directory, opened before the switch, as the C virtiofsd keeps an fd to /proc/self/fd.

No pid namespace: it needs a fork and a waiting parent, and standalone mode reads the caller's groups
from /proc/PID with the host's pids.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from daemon.passthrough import syscalls as sc
from dissectors.transport.wire import proc_fd

if TYPE_CHECKING:
    from daemon.passthrough import PassthroughFS

LEVELS = ("namespace", "chroot", "none")

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
MNT_DETACH = 2
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38

CAP = {"CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "SETGID": 6,
       "SETUID": 7, "SETPCAP": 8, "SYS_CHROOT": 18, "SYS_ADMIN": 21, "MKNOD": 27, "SETFCAP": 31}
# What passthrough needs after setup, as the C virtiofsd keeps (DAC_READ_SEARCH: open_by_handle_at).
KEEP = ("CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "SETGID", "SETUID", "MKNOD", "SETFCAP")
_NEEDS = {"namespace": "SYS_ADMIN", "chroot": "SYS_CHROOT"}


class SandboxError(OSError):
    """The sandbox cannot be set up; the message says why and what to do."""


def default_level() -> str:
    """virtiofsd's default (namespace) when we are root; none otherwise, where the kernel's permission
    checks on our own user already bound what we reach (and namespaces would need the privilege)."""
    return "namespace" if os.geteuid() == 0 else "none"


def check(level: str) -> None:
    """Refuse, before anything starts, a level this process cannot enter."""
    if level not in LEVELS:
        raise SandboxError(errno.EINVAL, f"--sandbox {level}: choose one of {', '.join(LEVELS)}")
    need = _NEEDS.get(level)
    if need is not None and not (sc.has_effective_cap(CAP[need]) and sc.has_effective_cap(CAP["SETPCAP"])):
        raise SandboxError(errno.EPERM, f"--sandbox {level} needs root (CAP_{need} and CAP_SETPCAP): run the "
                                        "daemon as root, or choose --sandbox none")


def enter(level: str, fs: PassthroughFS, seccomp: str = "none", extra: tuple[str, ...] = ()) -> None:
    """Confine the calling thread (and the threads it starts from now on) at `level`, and make `fs`
    hold its root from inside; then the `seccomp` allowlist, plus the `extra` system calls a transport
    needs (io_uring_enter for FUSE over io_uring).  Call before the first request, with no other thread
    of the engine alive."""
    if level == "none":
        return
    check(level)
    _preload(seccomp)
    try:
        _enter(level, fs)
        load_seccomp(seccomp, extra)
    except SandboxError:
        raise
    except OSError as e:
        raise SandboxError(e.errno or errno.EPERM, f"--sandbox {level}: {e.strerror or e}") from None


# Imported on first use by code the serving threads run: after the switch the import system no longer
# finds the virtualenv's or Python's own files, so they are imported before.
_LAZY = ("dissectors.render", "fsinspect.analysis.render", "encodings.idna", "encodings.latin_1", "encodings.ascii")


_kept: list[object] = []


def _preload(seccomp: str) -> None:
    import ctypes
    import importlib

    for name in (*_LAZY, "pyseccomp") if seccomp != "none" else _LAZY:
        importlib.import_module(name)
    # glibc dlopen()s libgcc_s on a thread's first pthread_exit (Python ends daemon threads with it at
    # exit): once the library can no longer be found, that abort()s the daemon.  Loaded now, it is found.
    if not _kept:
        try:
            _kept.append(ctypes.CDLL("libgcc_s.so.1"))
        except OSError:
            pass


def _enter(level: str, fs: PassthroughFS) -> None:
    shared = os.path.realpath(fs.opts.shared_dir)
    proc = proc_fd()  # opened now, from the host's root, for every thread's use (vhost-user fd checks too)
    if level == "namespace":
        # CLONE_FS too: the root and cwd changed below are this thread's alone, not the main thread's.
        sc.unshare(CLONE_NEWNS | CLONE_NEWNET | sc.CLONE_FS)
        _pivot_into(shared)
    else:
        sc.unshare(sc.CLONE_FS)
        os.chroot(shared)
        os.chdir("/")
    fs.reroot("/", proc="")
    os.fchdir(proc)  # "self/fd/N" now names /proc/self/fd/N, where the xattr calls (no *at form) need a path
    # FUSE passthrough registers backing files, which the kernel allows only with CAP_SYS_ADMIN: it stays
    # permitted, never effective but around those two ioctls (passthrough/backing.py); seccomp still
    # refuses mount, umount2, pivot_root, chroot and setns, whatever the capabilities.
    drop_capabilities(permitted_only=("SYS_ADMIN",) if fs.opts.passthrough else ())


def _pivot_into(shared: str) -> None:
    """virtiofsd's setup_mounts: the shared dir becomes / of this mount namespace, the old / is gone."""
    # With shared propagation (systemd's default) our mounts would show up on the host: opt out first.
    sc.mount(None, "/", None, MS_REC | MS_SLAVE)
    sc.mount(shared, shared, None, MS_BIND | MS_REC)  # pivot_root wants a mount point
    old_root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    new_root = os.open(shared, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fchdir(new_root)
        sc.pivot_root(".", ".")  # the old root now sits on top of the new one, at "."
        os.fchdir(old_root)
        sc.mount(None, ".", None, MS_SLAVE | MS_REC)  # its unmount must not propagate to the host
        sc.umount2(".", MNT_DETACH)
        os.fchdir(new_root)
    finally:
        os.close(old_root)
        os.close(new_root)


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def drop_capabilities(keep: tuple[str, ...] = KEEP, permitted_only: tuple[str, ...] = ()) -> None:
    """Drop every capability but `keep`, from the bounding set too, and set no_new_privs: no exec of a
    setuid or file-capability binary can bring one back.  `permitted_only` stay permitted but not
    effective: code raises one for the one call that needs it."""
    mask = 0
    for name in keep:
        mask |= 1 << CAP[name]
    for cap in range(_last_cap() + 1):
        if not mask & (1 << cap):
            try:
                sc.prctl(PR_CAPBSET_DROP, cap)
            except OSError as e:
                if e.errno != errno.EINVAL:  # a capability this kernel does not know
                    raise
    sc.limit_caps(mask | sum(1 << CAP[name] for name in permitted_only))
    for name in permitted_only:
        sc.set_effective_cap(CAP[name], False)
    sc.prctl(PR_SET_NO_NEW_PRIVS, 1)


# ------------------------------------------------------------------------------------------- seccomp
SECCOMP_ACTIONS = ("kill", "log", "none")
CLONE_THREAD = 0x00010000
# What the serving threads call: Python's runtime, the vhost-user and /dev/fuse transports, the engine and
# passthrough (measured with strace -f over the `full` guest workload with --xattr, --record and --control,
# plus every op passthrough implements).  No exec, fork, mount, chroot, socket/connect, ptrace, setuid.
ALLOWED = (
    # runtime: memory, threads, time, signals
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "futex", "set_robust_list", "rseq", "exit",
    "exit_group", "gettid", "getpid", "tgkill", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
    "restart_syscall", "clock_gettime", "clock_getres", "gettimeofday", "clock_nanosleep", "nanosleep",
    "sched_yield", "sched_getaffinity", "getrandom", "uname", "sysinfo", "prlimit64", "getrlimit", "getuid",
    "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups", "getcwd", "membarrier",
    # fds, polling, transports (sockets already connected: send/receive only)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    "close", "close_range", "dup", "dup2", "dup3", "fcntl", "ioctl", "lseek", "pipe2", "eventfd2", "poll",
    "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "recvfrom",
    "recvmsg", "sendto", "sendmsg", "shutdown", "getsockname", "getsockopt",
    # passthrough
    "openat", "openat2", "open_by_handle_at", "name_to_handle_at", "newfstatat", "fstat", "statx", "statfs",
    "fstatfs", "getdents64", "readlinkat", "mkdirat", "mknodat", "symlinkat", "linkat", "unlinkat", "renameat",
    "renameat2", "fchmod", "fchmodat", "fchown", "fchownat", "utimensat", "ftruncate", "fallocate",
    "copy_file_range", "fsync", "fdatasync", "syncfs", "flock", "faccessat", "faccessat2", "fchdir", "umask",
    "getxattr", "lgetxattr", "fgetxattr", "setxattr", "lsetxattr", "fsetxattr", "listxattr", "llistxattr",
    "flistxattr", "removexattr", "lremovexattr", "fremovexattr", "setfsuid", "setfsgid", "setgroups", "capget",
    "capset",
    # the path forms glibc uses for os.chmod/os.access/...: they resolve inside the sandbox's root and cwd
    "chmod", "access", "stat", "lstat", "open", "readlink", "truncate", "chown", "lchown", "utimes", "mkdir",
    "rmdir", "unlink", "rename", "link", "symlink", "mknod", "getdents", "fadvise64", "sendfile", "splice",
)


def load_seccomp(action: str, extra: tuple[str, ...] = ()) -> None:
    """Allow only ALLOWED in the calling thread and the threads it starts (a filter is per thread unless
    synchronised); anything else kills the daemon (kill) or is only logged by the kernel's audit (log).
    A new thread (clone with CLONE_THREAD) is allowed, a new process is not; clone3 answers ENOSYS so glibc
    falls back to clone, whose flags a filter can see (as virtiofsd does).  unshare only with CLONE_FS (the
    engine's per-thread umask)."""
    if action == "none":
        return
    import pyseccomp as s

    f = s.SyscallFilter(s.KILL_PROCESS if action == "kill" else s.LOG)
    for name in (*ALLOWED, *extra):
        try:
            f.add_rule(s.ALLOW, name)
        except (ValueError, RuntimeError, OSError):  # a name this architecture does not have
            pass
    f.add_rule(s.ALLOW, "clone", s.Arg(0, s.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    f.add_rule(s.ALLOW, "unshare", s.Arg(0, s.EQ, sc.CLONE_FS))
    f.add_rule(s.ERRNO(errno.ENOSYS), "clone3")
    f.load()

