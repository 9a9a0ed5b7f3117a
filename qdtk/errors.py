"""The one exception type users see: a message that names the file and tensor at fault.

The CLI turns it into `Error: ...` and a non-zero exit code, never a traceback. Operating-system
faults (no space, permission denied, a vanished file) become one line through
`os_error_message`: what happened, where, and what to do.
"""

from __future__ import annotations

import errno
import os


class QdtkError(Exception):
    """Bad input or an impossible request, explained in words."""


# errno -> (what happened, what to do); the rerun resumes: finished outputs are kept.
_OS_FAULTS = {
    errno.ENOSPC: ("no space left on device", "free space there (or write elsewhere) and rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free space there (or write elsewhere) and rerun"),
    errno.EACCES: ("permission denied", "make it writable/readable (or use another folder) "
                   "and rerun"),
    errno.EPERM: ("operation not permitted", "check its permissions (or use another folder) "
                  "and rerun"),
    errno.EROFS: ("read-only file system", "write to another folder and rerun"),
    errno.ENOENT: ("file or folder not found (removed while qdtk ran?)",
                   "check the path and rerun"),
    errno.EIO: ("input/output error", "check the disk and rerun"),
}


def os_error_message(e: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for an OSError: where (`path`, else the error's file), what, what to do."""
    where = path if path is not None else (e.filename or "(unknown path)")
    what, todo = _OS_FAULTS.get(e.errno, (e.strerror or str(e), "check the path and rerun"))
    return f"{where}: {what}; {todo} (finished outputs are kept, the rerun resumes)"


def os_fault(e: OSError, path: str | os.PathLike | None = None) -> QdtkError:
    """The QdtkError for an OSError met while writing or reading `path`."""
    return QdtkError(os_error_message(e, path))
