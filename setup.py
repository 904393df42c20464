"""Build of the optional accelerator (qcrypt/crypto/_xts.c, OpenSSL's XTS over many sectors per call).

Everything else is in pyproject.toml. ``optional=True``: without a C compiler or OpenSSL's headers
(Debian: gcc, python3-dev, libssl-dev) the build only warns, and qcrypt uses its numpy path instead.
"""

from __future__ import annotations

from setuptools import Extension, setup

setup(ext_modules=[Extension("qcrypt.crypto._xts", ["qcrypt/crypto/_xts.c"], libraries=["crypto"], optional=True)])
