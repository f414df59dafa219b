"""``python -m pagedlm ...`` (what torchrun runs: ``torchrun ... -m pagedlm serve ...``)."""

import sys

from pagedlm.cli import main

sys.exit(main())
