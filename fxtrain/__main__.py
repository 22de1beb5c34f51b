import sys

from .apps._cli import main

sys.exit(main())
