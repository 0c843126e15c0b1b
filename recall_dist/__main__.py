import sys

from recall_dist.cli import main

sys.exit(main())
