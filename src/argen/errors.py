"""User-facing errors: each one says what went wrong and what to do about it."""


class ArgenError(Exception):
    """An error caused by the caller's input; the message is meant for a person, not a traceback."""


class ModelNotFoundError(ArgenError):
    pass


class InvalidRequestError(ArgenError, ValueError):
    pass
