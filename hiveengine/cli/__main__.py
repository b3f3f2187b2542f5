import sys

from hiveengine.cli import main

sys.exit(main())
