import sys

from wsi_her2.cli import main

sys.exit(main())
