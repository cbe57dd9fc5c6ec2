"""The one exception type a user is meant to read.

Library code raises `MimkitError` for bad input (a missing path, an unknown model, an impossible
option); the CLI prints its message on one line and exits with status 2, never a traceback.
"""


class MimkitError(Exception):
    """A user-facing error whose message alone says what is wrong and how to fix it."""
