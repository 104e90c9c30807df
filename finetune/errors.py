"""The one error type users see: a single line, exit code 2, never a traceback."""


class UserError(Exception):
    """Bad input from the user (config, data, model name). `str(err)` is the whole message."""

    exit_code = 2
