"""The errors lensforge raises for things a user can fix.

The CLI prints any ``LensforgeError`` as one line and exits with code 2; the server (later)
maps them to 4xx. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LensforgeError(Exception):
    """Base class: a problem the user can fix. The message says what, where and what to do."""


class DataError(LensforgeError):
    """The dataset (folder, CSV, labels) is missing, empty or malformed."""


class ImageError(DataError):
    """One image could not be decoded safely.

    ``code`` is a stable, machine-readable reason that the server maps to an HTTP status:
    ``empty`` (400), ``unsupported_format`` (415), ``corrupt`` (400), ``too_large`` (413),
    ``too_small`` (400), ``unreadable`` (400).
    """

    HTTP_STATUS = {"empty": 400, "unsupported_format": 415, "corrupt": 400, "too_large": 413,
                   "too_small": 400, "unreadable": 400}

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def http_status(self) -> int:
        """The HTTP status every server dialect answers this with (RELIABILITY.md, I rows)."""
        return self.HTTP_STATUS.get(self.code, 400)


class ModelError(LensforgeError):
    """A backbone name, weights file or head does not fit."""


class ExportError(LensforgeError):
    """ONNX export failed or the exported model disagrees with the torch model."""


class BundleError(LensforgeError):
    """A bundle directory is missing files, corrupt, or from a newer lensforge."""


class TrainingInterrupted(LensforgeError):
    """Ctrl-C during training; a checkpoint to resume from was saved. (CLI exit code 130.)"""


class ConfigError(LensforgeError):
    """A run configuration value or YAML file is invalid."""


class ProviderError(LensforgeError):
    """An onnxruntime execution provider is unknown, not installed here, or failed to start."""


class RequestError(LensforgeError):
    """A server request that cannot be served as sent; the server answers ``status``.

    ``code`` is a stable machine-readable reason (``invalid_base64``, ``body_too_large``...),
    the message is safe to show to the client (no paths, no tracebacks).
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
