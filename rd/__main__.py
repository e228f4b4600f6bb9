import sys

from rd.cli import main

sys.exit(main())
