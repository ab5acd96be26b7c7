import sys

from snapcore.cli import main

sys.exit(main())
