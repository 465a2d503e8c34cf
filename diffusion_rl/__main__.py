"""``python -m diffusion_rl``."""

import sys

from diffusion_rl.cli import main

sys.exit(main())
