"""Files that hold the guest's data (recordings, summaries, exported exchanges) are created 0600.

They carry file names and snaplen bytes of file contents, so they are private by default, like the control
socket; `--record-mode` asks for another mode.  The mode is set exactly (fchmod before the first byte is
written), whatever the process umask: the daemon runs with umask 0, and a user who asks for 0640 gets 0640.
"""

from __future__ import annotations

import argparse
import os

DEFAULT_MODE = 0o600


def parse_mode(text: str) -> int:
    """`--record-mode` in octal (600, 0640, 0o644); argparse turns the ValueError into a one-line error."""
    try:
        mode = int(text.removeprefix("0o"), 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode (e.g. 0600 or 0640)") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r}: a file mode is 0 to 0777 (permission bits only)")
    return mode


def add_mode_option(g: argparse._ActionsContainer) -> None:
    g.add_argument("--record-mode", type=parse_mode, default=DEFAULT_MODE, metavar="MODE",
                   help="octal mode of the files written with the guest's data (recordings, --summary-json); "
                        "default 0600")


def create(path: str | os.PathLike[str], mode: int = DEFAULT_MODE, *, append: bool = False,
           dir_fd: int | None = None) -> int:
    """Open `path` (relative to `dir_fd` if given) for writing, created or truncated, with exactly `mode`."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | (os.O_APPEND if append else 0)
    fd = os.open(path, flags, mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)  # the umask only takes bits away; an existing file keeps its old mode otherwise
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_rw(path: str | os.PathLike[str], mode: int = DEFAULT_MODE) -> int:
    """Open `path` for reading and writing as it is, or create it empty with exactly `mode`."""
    return _open_or_create(path, os.O_RDWR, mode)


def open_append(path: str | os.PathLike[str], mode: int = DEFAULT_MODE) -> int:
    """Open `path` to append to it as it is (its mode is the user's), or create it empty with exactly `mode`."""
    return _open_or_create(path, os.O_WRONLY | os.O_APPEND, mode)


def _open_or_create(path: str | os.PathLike[str], flags: int, mode: int) -> int:
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        return os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_file(path: str | os.PathLike[str], data: str | bytes, mode: int = DEFAULT_MODE) -> None:
    """Write `data` to `path` (replaced whole, never seen half written) with exactly `mode`."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    fd = create(tmp, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
