"""``python -m jsnmf``: the ``jsnmf`` command line."""

import sys

from jsnmf.cli import main

sys.exit(main())
