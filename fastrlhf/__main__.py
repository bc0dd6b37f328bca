"""`python -m fastrlhf` = the `fastrlhf` command (what `torchrun -m fastrlhf train ...` runs)."""
import sys

from .cli import main

sys.exit(main())
