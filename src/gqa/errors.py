"""User errors and warnings.

`GQAError` is the one exception type for mistakes a user can make (bad arguments, files, shapes): the CLI
prints its message on one line and exits with status 2; library callers can catch it.
`warn` reports something legal but probably unintended (a source without tokenizer files, α > 1): a
`GQAWarning` that the CLI prints as one `gqa: warning:` line and library callers can filter.
"""

import warnings


class GQAError(Exception):
    """A user error: its message is one line that says what is wrong and, where possible, what to do."""


class GQAWarning(UserWarning):
    """Legal input that is probably not what the user meant; the work goes on."""


def warn(message: str) -> None:
    warnings.warn(message, GQAWarning, stacklevel=2)
