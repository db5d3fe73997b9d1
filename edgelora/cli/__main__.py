"""`python -m edgelora.cli VERB ...`: what torchrun launches (`torchrun ... -m edgelora.cli train ...`)."""

import sys

from edgelora.cli import main

sys.exit(main())
