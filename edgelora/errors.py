"""The one exception type users see: a message that names the file, the problem and the fix."""


class EdgeloraError(Exception):
    """A failure the user can act on; the CLI prints it as one line and exits non-zero."""
