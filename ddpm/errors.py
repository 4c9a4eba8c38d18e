"""The library's error types for what a user can fix (a bad setting or input, a training run
that diverged), as opposed to a bug. The command line prints these as one line and lets any
other exception (a shape error, CUDA out of memory) through with its traceback."""


class DDPMError(Exception):
    """An error the user can fix; its message names the setting, file or step at fault."""


class InputError(DDPMError, ValueError):
    """A bad argument, setting or input file (a ValueError, for callers that catch those)."""


class DivergedError(DDPMError, FloatingPointError):
    """Training became non-finite (the loss, the weights or their averages)."""


class NonFiniteError(DDPMError, FloatingPointError):
    """A value that must be finite is NaN or infinite (a checkpoint's weights, sampled images, features,
    a metric); the message names the file, tensor or key. Nothing is computed from it or written."""


class DiskFullError(DDPMError):
    """An output could not be written because its device (or the user's quota) is full; the
    message names the file and the space it needs. Nothing half-written is left behind."""


class FastPathWarning(RuntimeWarning):
    """A fast path failed and the run goes on on the plain path (``ddpm.acceleration.Fallback``)."""
