"""The one error type users see: a single line, exit code 2, never a traceback."""


class UserError(Exception):
    """Bad input from the user (config, data, model name). `str(err)` is the whole message."""

    exit_code = 2


def first_line(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type's name when empty), cut to `limit`: how a library's
    error is quoted inside one of ours."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]
