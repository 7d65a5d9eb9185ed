import sys

from obdprune.cli import main

sys.exit(main())
