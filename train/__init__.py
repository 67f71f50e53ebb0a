"""Command-line entry point: ``python -m train --config configs/NAME.py --workdir DIR``."""
