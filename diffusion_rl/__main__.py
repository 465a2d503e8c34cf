"""``python -m diffusion_rl``."""

import sys

from diffusion_rl.cli import main

if __name__ == "__main__":  # the sweep's worker processes import this module without running it
    sys.exit(main())
