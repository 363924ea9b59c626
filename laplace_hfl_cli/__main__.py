"""``python -m laplace_hfl_cli``: the ``laplace-hfl`` console script."""

import sys

from laplace_hfl_cli import main

sys.exit(main())
