# Copyright: qcrypt developers
# GNU General Public License v2.0 or later, hence also v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    """The options every module shares through module_utils/qcrypt_cli.py (COMMON_ARGUMENT_SPEC)."""

    DOCUMENTATION = r"""
options:
  executable:
    description:
      - Path of the C(qcrypt) command on the managed host.
      - By default C(qcrypt) is looked up in E(PATH), then in C(/opt/qcrypt/bin) (where the
        P(qcrypt.qcrypt.install#role) role installs it).
    type: path
  timeout:
    description:
      - Seconds after which qcrypt is stopped (it removes its unfinished files) and the task fails.
    type: int
    default: 3600
"""
