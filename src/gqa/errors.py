"""The one exception type for mistakes a user can make (bad arguments, files, shapes).

The CLI prints its message on one line and exits with status 2; library callers can catch it.
"""


class GQAError(Exception):
    """A user error: its message is one line that says what is wrong and, where possible, what to do."""
