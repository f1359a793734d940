"""``python -m fedmm_secure.cli``: the same as the ``fedmm-secure`` console script."""

import sys

from . import main

__all__: list[str] = []

sys.exit(main())
