"""``python -m m2iv.cli ...`` (e.g. under ``torchrun``) = the ``m2iv`` command."""
import sys

from . import main

sys.exit(main())
