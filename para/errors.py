"""User-facing errors: each carries one line that names the file, tensor or line, and the fix."""


class UserError(Exception):
    """A problem with the user's input, not a bug: the CLIs print it on one line and exit 2."""


class CheckpointError(UserError):
    """A checkpoint folder that cannot be loaded as it is."""
