import sys

from depthq.cli import main

sys.exit(main(["watch", *sys.argv[1:]]))
