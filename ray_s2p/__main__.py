"""``python -m ray_s2p`` is the ``ray-s2p`` command."""

import sys

from .cli import main

sys.exit(main())
