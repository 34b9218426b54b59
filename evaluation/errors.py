"""Errors of `latentdit evaluate`: one line naming the bad file or value and the fix."""

from foundation.errors import LatentditError


class EvaluationError(LatentditError):
    """An input to evaluate cannot be used (wrong shape or dtype, mixed sizes, empty, mismatched)."""


class NetworkError(EvaluationError):
    """The feature network is missing, corrupt, or not an Inception-v3 port."""
