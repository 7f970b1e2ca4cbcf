import sys

from retina_dist.cli import main

sys.exit(main())
