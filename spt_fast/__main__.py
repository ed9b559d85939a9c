"""`python -m spt_fast ...` (and `torchrun -m spt_fast ...`): the spt-fast command."""
import sys

from .cli import main

sys.exit(main())
