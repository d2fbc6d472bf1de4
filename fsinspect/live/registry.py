"""Where live sources can be found: the control sockets running proxies and daemons registered, plus the
ones the user names.  `fsinspect extcap` lists them as Wireshark interfaces.

- Every Hub (`--control SOCK` on `fsinspect proxy` and `fsinspect daemon`) puts a symlink to its socket in
  `runtime_dir()/control/` while it runs, and removes it when it closes; a link whose socket is gone (a
  killed process) is skipped and cleaned up by the next lookup.
- `$FSINSPECT_CONTROL` (paths separated by `:`) and `~/.config/fsinspect/control-sockets` (one path a line,
  `#` comments) name sockets of sources that do not register (another user's, another runtime dir), and
  are listed whether or not they are up yet, as Wireshark lists an interface that is down.

runtime_dir() is `$FSINSPECT_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/fsinspect`, else `/tmp/fsinspect-UID`;
it is created 0700 and used only if it is ours and nobody else can write it (a shared /tmp).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fsinspect.registry")
ENV_SOCKETS = "FSINSPECT_CONTROL"
ENV_RUNTIME = "FSINSPECT_RUNTIME_DIR"
PREFIX = "fsinspect-"  # every interface name starts with it (the extcap's namespace in Wireshark)


@dataclass(frozen=True)
class Endpoint:
    name: str  # the interface name: fsinspect-<stem>-<hash of the path>
    path: str  # the control socket
    how: str  # "registered", "$FSINSPECT_CONTROL" or the config file's path

    @property
    def up(self) -> bool:
        try:
            return stat.S_ISSOCK(os.stat(self.path).st_mode)
        except OSError:
            return False


def runtime_dir() -> Path:
    env = os.environ.get(ENV_RUNTIME)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "fsinspect" if xdg else Path(f"/tmp/fsinspect-{os.getuid()}")


def config_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "fsinspect" / "control-sockets"


def name_for(path: str) -> str:
    """A stable interface name for a socket path: readable stem plus a short hash of the absolute path."""
    full = os.path.abspath(path)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(full).name.removesuffix(".sock"))[:32] or "control"
    return f"{PREFIX}{stem}-{hashlib.sha1(full.encode()).hexdigest()[:6]}"


def _control_dir(create: bool) -> Path | None:
    """The registry folder, if it is safe to use (ours, 0700): never follow another user's links."""
    d = runtime_dir() / "control"
    try:
        if create:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for p in (d.parent, d):
            st = os.lstat(p)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
                log.warning("not using %s for the control-socket registry: not a private folder of ours", p)
                return None
    except OSError:
        return None
    return d


def register(path: str) -> Path | None:
    """Announce a control socket; the link to remove with unregister(), or None if it could not be made."""
    d = _control_dir(create=True)
    if d is None:
        return None
    link = d / name_for(path)
    try:
        tmp = d / f".{link.name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.abspath(path), tmp)
        os.replace(tmp, link)
    except OSError as e:
        log.warning("could not register %s in %s: %s", path, d, e.strerror or e)
        return None
    return link


def unregister(link: Path | None, path: str) -> None:
    """Remove our link (unless another process registered the same path since)."""
    if link is None:
        return
    try:
        if os.readlink(link) == os.path.abspath(path):
            link.unlink()
    except OSError:
        pass


def _named() -> list[tuple[str, str]]:
    out = [(p, f"${ENV_SOCKETS}") for p in os.environ.get(ENV_SOCKETS, "").split(":") if p.strip()]
    cfg = config_file()
    try:
        text = cfg.read_text()
    except OSError:
        text = ""
    out += [(ln.strip(), str(cfg)) for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return out


def discover() -> list[Endpoint]:
    """Every known control socket: the ones the user named first, then the running sources', by name."""
    seen: set[str] = set()
    found: list[Endpoint] = []
    for path, how in _named():
        full = os.path.abspath(os.path.expanduser(path))
        if full not in seen:
            seen.add(full)
            found.append(Endpoint(name_for(full), full, how))
    d = _control_dir(create=False)
    registered: list[Endpoint] = []
    if d is not None:
        for link in sorted(d.iterdir()):
            if link.name.startswith("."):
                continue
            try:
                target = os.readlink(link)
            except OSError:
                continue
            ep = Endpoint(link.name, target, "registered")
            if not ep.up:  # its source died without unregistering
                link.unlink(missing_ok=True)
                continue
            if target not in seen:
                seen.add(target)
                registered.append(ep)
    return found + registered


def find(name: str) -> Endpoint | None:
    return next((ep for ep in discover() if ep.name == name), None)
