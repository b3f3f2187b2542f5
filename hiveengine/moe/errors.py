"""Errors of the Mixture-of-Experts layer; all are HiveEngineErrors with messages that say what to do."""

from hiveengine.errors import ConfigurationError, HiveEngineError


class ExpertError(HiveEngineError):
    """Base class of errors raised by expert servers and remote experts."""


class InvalidExpertUIDError(ExpertError, ConfigurationError):
    """An expert uid or uid pattern is malformed (expected e.g. `ffn.3.17` or `ffn.[0:4].[0:4]`)."""


class UnknownExpertClassError(ExpertError, ConfigurationError):
    """No expert class is registered under the requested name."""


class NotEnoughExpertsError(ExpertError, RuntimeError):
    """Fewer experts than `k_min` answered for some sample (raise timeouts, or allow zero outputs)."""
