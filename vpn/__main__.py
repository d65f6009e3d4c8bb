import sys

from vpn.cli import main

sys.exit(main())
