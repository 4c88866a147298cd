"""``python -m diffmem`` (and ``accelerate launch -m diffmem``)."""

import sys

from diffmem.cli import main

sys.exit(main())
