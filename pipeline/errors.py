"""The pipeline's own errors, beside the library's (``ddpm.errors``): printed as one line."""

from ddpm.errors import DDPMError, InputError


class ExternalError(DDPMError, RuntimeError):
    """A tool outside the project (DVC, MLflow) failed; the message says what to do."""


class OutputError(InputError):
    """An output cannot be written where it is asked for."""
