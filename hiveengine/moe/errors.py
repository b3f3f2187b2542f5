"""Errors of the Mixture-of-Experts layer; all are HiveEngineErrors with messages that say what to do.

The errors a server raises to refuse a request are ProtocolErrors (a refusal, not a failure of the server, so
clients keep routing to it) and are registered with the transport, so the caller raises the same class.
"""

from hiveengine.errors import ConfigurationError, HiveEngineError, ProtocolError
from hiveengine.transport.dispatch import REMOTE_ERROR_TYPES


class ExpertError(HiveEngineError):
    """Base class of errors raised by expert servers and remote experts."""


class InvalidExpertUIDError(ExpertError, ConfigurationError):
    """An expert uid or uid pattern is malformed (expected e.g. `ffn.3.17` or `ffn.[0:4].[0:4]`)."""


class UnknownExpertClassError(ExpertError, ConfigurationError):
    """No expert class is registered under the requested name."""


class NotEnoughExpertsError(ExpertError, RuntimeError):
    """Fewer experts than `k_min` answered for some sample (raise timeouts, or allow zero outputs)."""


class NonFiniteRequestError(ExpertError, ProtocolError):
    """A request's inputs or gradients hold NaN or Inf; the server refused it and applied nothing."""


class SampleTooLargeError(ExpertError, ProtocolError):
    """A request's samples are larger than the server's `max_sample_bytes` (e.g. sequences too long for it)."""


class NonFiniteReplyError(ExpertError, ProtocolError):
    """An expert server answered NaN or Inf: it is broken or hostile, and its answer is dropped."""


REMOTE_ERROR_TYPES.update({cls.__name__: cls for cls in (NonFiniteRequestError, SampleTooLargeError)})
