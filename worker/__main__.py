import sys

from worker.worker import main

sys.exit(main())
