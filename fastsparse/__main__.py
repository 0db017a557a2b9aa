"""``python -m fastsparse``: the same as the ``fastsparse`` command."""

import sys

from fastsparse.workflow.cli import main

sys.exit(main())
