import sys

from gradproj.cli import main

sys.exit(main())
