"""The exceptions oncolake raises; jobs map them to exit codes."""


class OncolakeError(Exception):
    """Base of every error oncolake raises on purpose. Exit code 1."""

    exit_code = 1


class ConfigError(OncolakeError):
    """Bad configuration or command-line usage. Exit code 2."""

    exit_code = 2


class InputError(OncolakeError):
    """An input the job was pointed at is missing or unreadable. Exit code 1."""

    exit_code = 1


class DataQualityError(OncolakeError):
    """A data-quality gate refused the data. Exit code 3."""

    exit_code = 3
