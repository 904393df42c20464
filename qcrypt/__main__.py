"""``python -m qcrypt`` runs the command line."""

from __future__ import annotations

from qcrypt.cli.main import main

if __name__ == "__main__":
    main()
