"""``python3 -m softpage``: the same as the ``softpage`` command."""

import sys

from softpage.cli.main import main

sys.exit(main())
