"""Deployment errors, all under the same base as the method's errors so the CLI turns any into one line."""

from uniforget.errors import ParityError, UniforgetError


class ExportError(UniforgetError):
    """An export or build step failed (ONNX export, graph clean-up, engine build, repository write)."""


class MissingDependencyError(UniforgetError):
    """An optional dependency (TensorRT, tritonclient, a Triton server) is not installed."""


class ValidationError(ParityError):
    """A validation gate failed; carries every failed check, not only the first."""

    def __init__(self, message: str, failures: list[str] | None = None):
        super().__init__(message)
        self.failures = failures or []
