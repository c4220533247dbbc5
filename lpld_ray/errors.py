"""User-facing errors: each message is one line naming the bad value and what is allowed."""


class LpldError(Exception):
    """Bad input the user can fix; ``str(err)`` is a single line."""


class ConfigError(LpldError):
    """A config key or value is unknown or out of range."""


class StorageError(LpldError):
    """A URI, object or manifest cannot be used."""


class DataError(LpldError):
    """A dataset is missing or malformed."""


class ModelError(LpldError):
    """Model weights are missing or do not fit the model."""
