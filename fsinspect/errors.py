"""Errors shared by the CLI commands (kept apart from cli.py so `python -m` imports one copy)."""

from __future__ import annotations


class UserError(Exception):
    """An error to report as one line; exit status 2 (bad input) unless `status` says otherwise."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status
