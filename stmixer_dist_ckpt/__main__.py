"""``python -m stmixer_dist_ckpt`` runs the ``stmixer-ckpt`` command line."""

import sys

from .cli import main

sys.exit(main())
