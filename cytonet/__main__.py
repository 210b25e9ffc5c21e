"""``python -m cytonet <command> ...``: the same as the ``cytonet`` command (e.g. ``torchrun -m cytonet pretrain``)."""

import sys

from cytonet.cli import main

sys.exit(main())
