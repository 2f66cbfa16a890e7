"""``python -m ovdiff_core``: the ``ovdiff`` command (see :mod:`ovdiff_core.cli`)."""

import sys

from ovdiff_core.cli import main

if __name__ == "__main__":
    sys.exit(main())
