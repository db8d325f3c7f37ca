"""Typed service errors. Each maps to one HTTP status and error code in ``api.errors``.

Messages must never contain submitted values (pixels, field values, filenames): they
name the problem and, at most, a schema field name.
"""

from __future__ import annotations


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class UndecodableImage(ServiceError):
    status, code = 400, "undecodable_image"


class ModelNotFound(ServiceError):
    status, code = 404, "model_not_found"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidTabular(ServiceError):
    status, code = 422, "invalid_tabular"


class InvalidRequest(ServiceError):
    status, code = 422, "invalid_request"


class MissingInput(ServiceError):
    status, code = 422, "missing_input"


class InferenceFailed(ServiceError):
    status, code = 500, "inference_failed"


class Overloaded(ServiceError):
    status, code = 503, "overloaded"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class QueueUnavailable(ServiceError):
    status, code = 503, "queue_unavailable"


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class ModelUnavailable(ServiceError):
    """A version in the repository that this deployment does not serve (its self-check
    refused it): retrying soon will not help, only a refitted version will (hot reload)."""

    status, code = 503, "model_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=60.0)


class ManifestError(Exception):
    """A model directory whose manifest and ONNX graph disagree; stops start-up."""
