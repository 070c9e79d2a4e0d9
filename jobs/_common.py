"""Shared bits of the job entry points: a bare ray.init() and exit codes.

Job entry points connect with ``ray.init()`` and no address: under ``ray job
submit`` RAY_ADDRESS names the cluster; run by hand they start a local Ray.
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


def run_job(body: Callable[[], int]) -> None:
    """Connect to Ray, run ``body`` and exit with its code (1 on an exception, with the error printed)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized():
        ray.init()
    try:
        code = body()
    except SystemExit as exc:
        code = int(exc.code or 0)
    except Exception:  # a job must say why it failed and exit non-zero
        traceback.print_exc()
        code = 1
    sys.exit(code)
