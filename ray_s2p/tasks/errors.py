"""The error type of task construction (data errors are ``ray_s2p.data_sources.DataError``)."""

from __future__ import annotations


class TaskError(ValueError):
    """A task cannot be built or used as configured; the message names the field and the fix."""
