import sys

from nasfast.cli.app import main

sys.exit(main())
