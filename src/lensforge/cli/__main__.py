"""``python -m lensforge.cli``: the same as the ``lensforge`` command."""

import sys

from lensforge.cli import main

sys.exit(main())
