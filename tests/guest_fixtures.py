"""Fixtures for tests that boot the real guest (QEMU + Debian kernel + busybox) against a real backend.

`guest_image` builds the guest once per session: on a fresh machine that downloads the kernel package
(about 30 s); afterwards it is a cache hit.  `guest_share` is the host share with tmpfs submounts at
sub/ and sub/inner/, always unmounted afterwards.  `boot_virtiofsd` boots the guest against the C
virtiofsd serving a share.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fsinspect.guest import build, launcher, share
from fsinspect.guest.console import GuestResult


@pytest.fixture(scope="session")
def guest_image() -> build.GuestImage:
    if os.geteuid() != 0:
        pytest.fail("guest tests need root (virtiofsd, tmpfs mounts); CI runs as root")
    try:
        return build.build(progress=lambda m: print(f"guest build: {m}", file=sys.stderr))
    except build.BuildError as e:
        pytest.fail(f"building the guest failed: {e}")


@pytest.fixture
def guest_share() -> Iterator[share.Share]:
    with share.make_share() as s:
        yield s
    assert not any(share.is_mountpoint(m) for m in s.mounts), "share tmpfs left mounted"
    assert not s.root.exists(), "share directory left behind"


BootVirtiofsd = Callable[..., GuestResult]


@pytest.fixture
def boot_virtiofsd(guest_image: build.GuestImage, guest_share: share.Share) -> BootVirtiofsd:
    """boot(workload, announce_submounts=True, xattr=True, timeout=90, **run_guest kwargs) -> GuestResult."""

    def boot(workload: str, *, announce_submounts: bool = True, xattr: bool = True,
             timeout: float = 90.0, **kwargs: Any) -> GuestResult:
        def backend(work: Any) -> Any:
            return launcher.virtiofsd(guest_share.root, work, announce_submounts=announce_submounts,
                                      xattr=xattr)
        params = dict(kwargs.pop("params", {}))
        params.setdefault("xattr", int(xattr))
        return launcher.run_with_backend(backend, image=guest_image, workload=workload, timeout=timeout,
                                         params=params, **kwargs)

    return boot


def explain(res: GuestResult) -> str:
    """Assertion message: status, failures and the console tail, so a CI failure is readable."""
    tail = "\n".join(res.console[-30:])
    return (f"status={res.status} failed={res.failed_steps} checks={res.check_failures} errors={res.errors} "
            f"lost={res.backend_lost_reason} qemu_stderr={res.qemu_stderr[-5:]}\n--- console tail ---\n{tail}")
