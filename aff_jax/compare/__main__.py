import sys

from aff_jax.compare.cli import main

sys.exit(main())
