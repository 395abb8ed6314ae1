import sys

from davit.cli import main

sys.exit(main())
