"""The one exception type users see: a message that names the file and tensor at fault.

The CLI turns it into `Error: ...` and a non-zero exit code, never a traceback.
"""


class QdtkError(Exception):
    """Bad input or an impossible request, explained in words."""
