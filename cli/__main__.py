"""``python -m flux2kit.cli``: the same as the ``flux2kit`` command."""

import sys

from . import main

sys.exit(main())
