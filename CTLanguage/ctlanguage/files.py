"""Permissions of the files we write.

``tempfile.mkstemp`` creates files readable by their owner only (0600), which is right for a
secret but wrong for results: a CT encoding, a phantom or an export should get the mode any other
program would give it, 0666 minus the user's umask (0644 under the usual umask 022).
"""

from __future__ import annotations

import os
import re


def current_umask() -> int:
    try:  # Linux: read it without changing it (os.umask is a set-and-get, not thread-safe)
        with open("/proc/self/status", encoding="ascii") as fh:
            m = re.search(r"^Umask:\s*([0-7]+)", fh.read(), re.M)
        if m:
            return int(m.group(1), 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_shared(path: str | os.PathLike) -> None:
    """Give a file made by mkstemp the default mode of a new file (0666 & ~umask)."""
    os.chmod(path, 0o666 & ~current_umask())
