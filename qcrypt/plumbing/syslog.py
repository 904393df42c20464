"""Syslog lines that never wait: one datagram to /dev/log, sent non-blocking (syslog(3) blocks while the
daemon's queue is full, which would hold a libvirt hook and so a VM's start)."""

from __future__ import annotations

import os
import socket
import syslog
import time

SYSLOG_SOCKET = "/dev/log"  # where syslog(3) sends its lines


def printable(text: str) -> str:
    """``text`` with control characters escaped, so one message stays one log line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def send_to_syslog(priority: int, message: str, ident: str) -> None:
    """Log one line as ``ident`` to the daemon facility (journald and syslog daemons pick it up), in the form
    syslog(3) sends: ``<PRI>Mmm dd hh:mm:ss IDENT[PID]: MESSAGE``.

    Sent without ever waiting: syslog(3) blocks while the daemon's queue is full (a stuck or overloaded
    daemon would hold the hook, and so the VM's start), so the datagram goes out non-blocking and a full
    queue or a missing socket raises OSError (the line is lost; callers report or ignore it)."""
    stamp = time.strftime("%b %d %H:%M:%S", time.localtime())
    line = f"<{syslog.LOG_DAEMON | priority}>{stamp} {ident}[{os.getpid()}]: {message}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        sender.connect(SYSLOG_SOCKET)
        sender.send(line.encode("utf-8", "replace"))


def syslog_listening() -> bool:
    """True when something listens at the syslog socket (a syslog daemon or journald): a datagram socket
    connects to it (a socket file left behind by a daemon that is gone refuses the connection)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(SYSLOG_SOCKET)
        except OSError:
            return False
    return True
