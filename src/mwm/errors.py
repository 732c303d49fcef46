"""Errors users see. Each message names the input at fault and the fix."""


class MWMError(Exception):
    """Base class for every error the command line reports without a traceback."""


class DataError(MWMError, ValueError):
    """A dataset path, manifest or option that cannot be used as given."""


class ReadError(DataError):
    """One file could not be decoded; carries the file so callers can skip it."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read {path}: {reason}")
