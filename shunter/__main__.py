import sys

from shunter.cli import main

sys.exit(main())
