"""The exceptions the command line turns into a message and an exit status.

Library code raises `MimkitError` for bad input (a missing path, an unknown model, an impossible
option); the CLI prints its message on one line and exits with status 2, never a traceback. A run
stopped by a signal raises `Interrupted` after saving: exit status 130.
"""


class MimkitError(Exception):
    """A user-facing error whose message alone says what is wrong and how to fix it."""


class Interrupted(Exception):
    """A run stopped on Ctrl-C or SIGTERM after saving a checkpoint (the loop has said where); the CLI
    exits with status 130 so that scripts and schedulers do not take the run for finished."""
