"""`python -m pipeline.report --params params.yaml`: one report per sweep (pipeline.report.build)."""

import sys

from pipeline.report.build import main

sys.exit(main())
