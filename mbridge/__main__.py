import sys

from mbridge.cli import main

sys.exit(main())
