"""``python -m quantsave``."""

import sys

from quantsave.cli import main

sys.exit(main())
