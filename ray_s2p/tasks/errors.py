"""The error type of task construction (data errors are ``ray_s2p.data.sources.DataError``)."""

from __future__ import annotations

from ..errors import RayS2PError


class TaskError(RayS2PError, ValueError):
    """A task cannot be built or used as configured; the message names the field and the fix."""


def brief(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut to ``limit`` characters (for wrapping in our messages)."""
    return " ".join(str(exc).split())[:limit]


def check_options(options: dict, known: set[str], task: str) -> None:
    """Reject unknown ``task.options`` keys (typos would otherwise be ignored silently).

    Raises:
        TaskError: naming the first unknown key and the known ones.
    """
    unknown = sorted(set(options) - known)
    if unknown:
        raise TaskError(f"config field 'task.options.{unknown[0]}': unknown option for task {task!r}. "
                        f"Fix: use one of {', '.join(sorted(known))}")
