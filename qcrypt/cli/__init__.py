"""The ``qcrypt`` command line (click). The only place that prints, prompts or draws progress bars."""
