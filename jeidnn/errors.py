"""The one exception type a user can cause."""


class JeidnnError(Exception):
    """A problem with the user's input (config, file, column, model folder...).

    The CLI prints its message on one line and exits with status 2, without a
    traceback. Messages name the bad value and say what to do.
    """

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
