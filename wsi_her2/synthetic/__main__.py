"""``python -m wsi_her2.synthetic OUT.svs --preset demo|graded|bench``."""
import sys

from wsi_her2.synthetic.slides import main

sys.exit(main())
