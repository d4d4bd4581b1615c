"""``python -m laneway.batch_cli submit ...``: `laneway batch` on its own."""

import sys

from laneway.batch_cli.commands import main

sys.exit(main())
