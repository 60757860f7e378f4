"""``python -m ngdiag.cli``: the ``ngdiag`` command."""

import sys

from ngdiag.cli.app import main

sys.exit(main())
