"""``python -m diffmem.cli``: the ``diffmem`` command."""

import sys

from diffmem.cli import main

sys.exit(main())
