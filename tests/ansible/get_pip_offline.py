"""Stand-in for get-pip.py, the script ansible-test downloads to put pip into its sanity-test venvs.

ansible-test runs it as ``python get_pip_X_Y.py [pip install options] pip==X.Y``. Without network access the
download fails; this script does the same job with the standard library: ``ensurepip`` installs the pip that
ships with Python, which then installs the requested pip from the configured index (PyPI or a local mirror).
"""

from __future__ import annotations

import ensurepip
import os
import subprocess
import sys

GET_PIP_ONLY_OPTIONS = ("--no-setuptools", "--no-wheel")


def main() -> None:
    environment = dict(os.environ)  # ensurepip sets PIP_CONFIG_FILE=/dev/null in os.environ and leaves it
    ensurepip.bootstrap(upgrade=True)
    options = [arg for arg in sys.argv[1:] if arg not in GET_PIP_ONLY_OPTIONS]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *options], check=True, timeout=600, env=environment)


if __name__ == "__main__":
    main()
