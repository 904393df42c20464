"""On-disk declarations (construct), one module per format. No I/O or logic lives here."""
