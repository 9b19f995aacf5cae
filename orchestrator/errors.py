"""Errors that the CLI turns into one line and an exit status, never a traceback."""

from __future__ import annotations


class OrchError(Exception):
    """An error the user can fix; `str()` is the whole message, one line."""

    exit_code = 1


class ConfigError(OrchError):
    """A bad value in cluster.yaml (or a --set override), named by its dotted path."""

    exit_code = 2

    def __init__(self, source: str, path: str, problem: str) -> None:
        self.source = source
        self.path = path or "<top>"
        self.problem = problem
        super().__init__(f"{source}: {self.path}: {problem}")


class RunNotFound(OrchError):
    exit_code = 2


class UsageError(OrchError):
    """A bad command line or a command that does not apply (exit status 2, like argparse)."""

    exit_code = 2
