import sys

from depthq.cli import main

sys.exit(main(["work", *sys.argv[1:]]))
