"""``python -m ipmt_fast`` (and ``torchrun -m ipmt_fast``): the ``ipmt-fast`` command line."""
import sys

from .cli import main

sys.exit(main())
