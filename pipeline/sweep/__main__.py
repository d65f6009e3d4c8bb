"""`python -m pipeline.sweep SPEC [--profile P]`: run one sweep (pipeline.sweep.driver)."""

import sys

from pipeline.sweep.driver import main

sys.exit(main())
