"""The ``qcrypt`` command line (click). The only place that prints, prompts or draws progress bars."""

from __future__ import annotations

import os

# numpy's OpenBLAS starts a thread pool at import whose threads spin while idle, in the CLI and in every
# forked migrate worker (measured: 2-3% of a migration's CPU). qcrypt only uses elementwise numpy operations,
# which never call BLAS, so one thread is enough. Set before anything imports numpy; a caller's value wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
