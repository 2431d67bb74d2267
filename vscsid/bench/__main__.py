"""``python -m vscsid.bench``: the ``vscsid-bench`` command."""
import sys

from .cli import main

sys.exit(main())
