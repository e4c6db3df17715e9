import sys

from clipkit.cli import main

sys.exit(main())
