# Copyright: qcrypt developers
# GNU General Public License v2.0 or later, hence also v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Running the ``qcrypt`` command on the managed host: lookup, a hard timeout, JSON output, one-line errors.

The modules never import qcrypt: they call the installed command, so the module's Python and qcrypt's venv
are independent. ``AnsibleModule.run_command`` has no timeout, so the command runs under coreutils
``timeout``, which signals the whole process group (qcrypt's worker processes included).
"""

from __future__ import annotations

import json

# Where the collection's ``install`` role puts qcrypt (searched after PATH).
DEFAULT_VENV_BIN = "/opt/qcrypt/bin"
# Seconds between SIGTERM (qcrypt removes its temporary files) and SIGKILL.
KILL_AFTER_S = 30
# coreutils ``timeout``: 124 = the time limit was reached, 137 = it had to send SIGKILL.
TIMED_OUT_CODES = (124, 137)

COMMON_ARGUMENT_SPEC = {
    "executable": {"type": "path"},
    "timeout": {"type": "int", "default": 3600},
}


def qcrypt_command(module):
    """Absolute path of the qcrypt command: ``executable``, else PATH, else the install role's venv."""
    executable = module.params.get("executable")
    if executable:
        return executable
    return module.get_bin_path("qcrypt", required=True, opt_dirs=[DEFAULT_VENV_BIN])


def run_qcrypt(module, arguments, stdin_text=None):
    """Run ``qcrypt ARGUMENTS`` with the module's ``timeout``; return (rc, stdout, stderr).

    ``stdin_text`` (a passphrase) goes to the process on standard input exactly as given (no newline added:
    qcrypt uses every byte, as cryptsetup's --key-file does); it never appears on the command line.
    """
    timeout_s = module.params["timeout"]
    if timeout_s < 1:
        module.fail_json(msg="timeout must be at least 1 second")
    argv = [module.get_bin_path("timeout", required=True), "--kill-after=%d" % KILL_AFTER_S, str(timeout_s),
            qcrypt_command(module)] + list(arguments)
    rc, stdout, stderr = module.run_command(argv, data=stdin_text, binary_data=True,
                                            environ_update={"LC_ALL": "C.UTF-8"})
    if rc in TIMED_OUT_CODES:
        module.fail_json(msg="qcrypt %s did not finish within %d s and was stopped" % (arguments[0], timeout_s),
                         rc=rc, stderr=stderr)
    return rc, stdout, stderr


def one_line_error(stderr, rc):
    """qcrypt's own one-line message from its standard error (click's 'Error: ...' for usage errors)."""
    lines = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("qcrypt: ") or line.startswith("Error: "):
            return line
    if lines:
        return lines[-1]
    return "qcrypt exited with status %d and no message" % rc


def parse_report(module, rc, stdout, stderr):
    """The JSON document qcrypt printed; a missing or broken document fails the task with qcrypt's message."""
    try:
        document = json.loads(stdout)
    except ValueError:
        module.fail_json(msg=one_line_error(stderr, rc), rc=rc, stderr=stderr)
    if not isinstance(document, dict):
        module.fail_json(msg="qcrypt printed JSON that is not an object", rc=rc, stderr=stderr)
    return document
