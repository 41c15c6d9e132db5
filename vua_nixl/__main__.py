import sys

from vua_nixl.cli import main

sys.exit(main())
