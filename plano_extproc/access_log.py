"""The opt-in per-request access log: one JSON object per line (``--access-log PATH``).

Every worker appends to the same file: each line is written with one ``write`` on a file
opened with O_APPEND, which Linux keeps whole between processes. ``-`` writes to stdout.
Lines hold ids, model names, counts and times only (``observe.Observation.log_line``): no
prompt or answer text, no header values, no credentials.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("plano_extproc.access_log")


class AccessLog:
    __slots__ = ("_failed", "_fd", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        if path == "-":
            self._fd = sys.stdout.fileno()
        else:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._failed = False

    def write(self, line: str) -> None:
        try:
            os.write(self._fd, (line + "\n").encode())
            self._failed = False
        except OSError as e:  # a full disk must not fail requests; say so once per outage
            if not self._failed:
                log.error("access log %s: %s", self.path, e)
            self._failed = True

    def close(self) -> None:
        if self.path != "-":
            os.close(self._fd)
