import sys

from ._runq import main

sys.exit(main(sys.argv))
