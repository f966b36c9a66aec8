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
    """A data-quality gate refused the data. Exit code 3.

    ``summary``, if given, is what the job did before the gate (printed as its
    summary line all the same).
    """

    exit_code = 3

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary


class ImageError(ValueError):
    """An image (or DICOM file) failed validation; ``reason`` is one of ``oncolake.imaging.REASONS``.

    Not an :class:`OncolakeError`: a bad image is data to quarantine, not a
    job failure. ``detail`` is safe to store and log (a DICOM detail never
    quotes a tag value).
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # crosses a pipe from an isolated decoder (oncolake.isolation)
        return type(self), (self.reason, self.detail)
