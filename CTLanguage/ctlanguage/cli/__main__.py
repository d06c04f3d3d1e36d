"""``python -m ctlanguage.cli``: the same as the ``ctlanguage`` command."""

import sys

from . import main

sys.exit(main())
