"""Shared bits of the job entry points: connecting to Ray and exit codes.

Job entry points connect as ``ray.init()`` does: ``--address ADDR`` (any entry point,
removed from the arguments before the command sees them) wins, else RAY_ADDRESS
(which ``ray job submit`` sets), else a local Ray is started.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Callable

# Jobs run from the uploaded working directory; make the package importable from it.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pop_address(argv: list[str]) -> str | None:
    """Remove ``--address ADDR`` / ``--address=ADDR`` from ``argv`` (in place) and return ADDR (None if absent).

    Raises:
        SystemExit: ``--address`` without a value.
    """
    for i, arg in enumerate(argv):
        if arg == "--address":
            if i + 1 >= len(argv):
                raise SystemExit("--address needs a value, e.g. --address auto or --address HOST:6379")
            address = argv[i + 1]
            del argv[i:i + 2]
            return address
        if arg.startswith("--address="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def run_job(body: Callable[[], int]) -> None:
    """Connect to Ray, run ``body`` and exit with its code (1 on an exception, with the error printed)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    address = pop_address(sys.argv)
    if not ray.is_initialized():
        ray.init(address=address)  # None: RAY_ADDRESS if set, else a local Ray (ray.init's own rule)
    try:
        code = body()
    except SystemExit as exc:
        code = int(exc.code or 0)
    except Exception:  # a job must say why it failed and exit non-zero
        traceback.print_exc()
        code = 1
    sys.exit(code)
