"""``python -m pagedlm.kernels``: build this machine's CPU kernels into the cache."""

import sys

from pagedlm.kernels import build_main

sys.exit(build_main())
