import sys

from wsi_her2.cli import entry

sys.exit(entry())
