"""Shared pytest configuration.  Area-specific fixtures live in their own modules (pytest_plugins)."""

from __future__ import annotations

import os

import pytest


def require_root() -> None:
    """Root tests must run in CI (which is root); outside root they fail loudly rather than skip silently."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (CI runs as root); run the suite as root")

# Fixtures that boot the real guest (fsinspect.guest): guest_image, guest_share, boot_virtiofsd.
pytest_plugins = ["tests.guest_fixtures"]
