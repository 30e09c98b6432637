"""One exception tree for everything a user can cause; each class carries its CLI exit code.

Exit codes: 0 ok, 1 unexpected internal error, 2 usage error (click), and from 3 up one per family below.
"""

from __future__ import annotations


class EdgekitError(Exception):
    """Base of every error edgekit raises on purpose. ``hint`` says what to do about it."""

    exit_code = 3

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(EdgekitError):
    """A bad option, profile, plan file or budget."""

    exit_code = 3


class ModelLoadError(EdgekitError):
    """The model could not be found, imported or run."""

    exit_code = 4


class DataError(EdgekitError):
    """Calibration or evaluation data is missing, unreadable or malformed (names the file)."""

    exit_code = 5


class CalibrationError(DataError):
    """Calibration could not produce usable statistics."""


class UnsupportedOnTarget(EdgekitError):
    """The plan asks for something the target profile does not support."""

    exit_code = 6


class ExportError(EdgekitError):
    """Exporting or transforming the model for the runtime failed."""

    exit_code = 7


class VerificationFailed(EdgekitError):
    """The exported artifact does not match the original within the target's tolerances."""

    exit_code = 8

    def __init__(self, message: str, *, report=None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.report = report


class BundleError(EdgekitError):
    """A bundle is malformed, tampered with, or unsafe to unpack."""

    exit_code = 9


class SignatureError(BundleError):
    """A bundle's signature is missing, invalid, or made by a key that is not trusted."""


class AgentError(EdgekitError):
    """The on-device agent cannot do what was asked: bad request, no model installed, unreadable state."""

    exit_code = 10


class UpdateError(AgentError):
    """An update could not be fetched, verified or installed; the serving model is unchanged."""
