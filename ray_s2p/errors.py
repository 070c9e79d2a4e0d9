"""The project's one exception type for what a user can fix.

``RayS2PError`` marks an error whose message is the whole story: bad input (a config
key out of range, a step that was never reached), a missing or damaged file (a
truncated ledger, a checkpoint of another config), or a run that cannot go on (every
replica failed). The command line prints such an error as one line and exits 2.
Anything else that escapes a command is a bug: it keeps its traceback.

Each specific error (ConfigError, LedgerError, CheckpointError, ...) derives from it
and from the built-in type it has always been (ValueError or RuntimeError), so code
that catches those still does.
"""

from __future__ import annotations


class RayS2PError(Exception):
    """An error the user can act on; its message names the field or file and the fix."""
