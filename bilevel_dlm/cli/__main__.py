"""``python -m bilevel_dlm.cli`` runs the command line."""

import sys

from . import main

sys.exit(main())
