"""The one exception type a user can cause."""


class JeidnnError(Exception):
    """A problem with the user's input (config, file, column, model folder...).

    The CLI prints its message on one line and exits with status 2, without a
    traceback. Messages name the bad value and say what to do.
    """

    exit_code = 2
