"""``python -m maect`` (used by torchrun)."""

import sys

from maect.cli import main

sys.exit(main())
