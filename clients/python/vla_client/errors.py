"""Typed errors: one exception class per error code of the appliance's HTTP API.

Every error answer of the appliance is `{"error": "<what was wrong>", "code": "<code>"}` with an
HTTP status. The client raises the class of the code (e.g. `StateLengthMismatch` for
`state_length_mismatch`), a subclass of its family (`InvalidRequest`, `RateLimited`, ...), itself
a subclass of `ApplianceError`; an unknown code raises the family of its status.
"""


class ApplianceError(Exception):
    """An error answer of the appliance (or no answer at all: `ConnectionFailed`)."""

    def __init__(self, message, code=None, status=None, retry_after=None, body=None):
        super().__init__(message)
        self.message = message
        #: The appliance's machine-readable code, e.g. `rate_limited`.
        self.code = code
        #: The HTTP status.
        self.status = status
        #: Seconds the appliance asked the client to wait (`Retry-After`), if it said.
        self.retry_after = retry_after
        #: The whole JSON body (a policy denial carries `denied_by` and `policy`).
        self.body = body or {}

    def __str__(self):
        return f"{self.code or self.status}: {self.message}"


class ConnectionFailed(ApplianceError):
    """No answer: the connection failed, TLS did not verify, or the request timed out."""


class InvalidRequest(ApplianceError):
    """400, 413, 415, 422: the request was wrong; sending it again fails again."""


class Unauthorized(ApplianceError):
    """401: no credentials, or ones the appliance does not know."""


class Forbidden(ApplianceError):
    """403: the credentials may not do this."""


class NotFound(ApplianceError):
    """404: no such model, robot, policy or route."""


class PolicyDenied(ApplianceError):
    """422 from a policy: the action was denied (`denied_by` names the policy)."""

    @property
    def denied_by(self):
        return self.body.get("denied_by", {})


class RateLimited(ApplianceError):
    """429: this robot asked too often or has too much in flight; retry after `retry_after`."""


class Unavailable(ApplianceError):
    """503: the appliance is overloaded, shutting down or has no model; retry later."""


class DeadlineExceeded(ApplianceError):
    """408, 504: the request did not start within its deadline."""


class ServerError(ApplianceError):
    """500: the appliance failed."""


# Each code of the HTTP API and its family (appliance/src/error.rs, README "Error codes").
_CODES = {
    "malformed_json": InvalidRequest,
    "malformed_message": InvalidRequest,
    "invalid_field": InvalidRequest,
    "unsupported_media_type": InvalidRequest,
    "body_too_large": InvalidRequest,
    "body_read_failed": InvalidRequest,
    "image_too_large": InvalidRequest,
    "image_dimensions_too_large": InvalidRequest,
    "invalid_base64": InvalidRequest,
    "unsupported_image_format": InvalidRequest,
    "camera_missing": InvalidRequest,
    "instruction_too_long": InvalidRequest,
    "image_decode_failed": InvalidRequest,
    "state_length_mismatch": InvalidRequest,
    "invalid_value": InvalidRequest,
    "invalid_tensor": InvalidRequest,
    "invalid_inference_header": InvalidRequest,
    "model_load_failed": InvalidRequest,
    "policy_invalid": InvalidRequest,
    "signature_invalid": InvalidRequest,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "model_not_found": NotFound,
    "model_version_not_found": NotFound,
    "robot_not_found": NotFound,
    "policy_not_found": NotFound,
    "not_found": NotFound,
    "method_not_allowed": InvalidRequest,
    "conflict": InvalidRequest,
    "policy_rejected": PolicyDenied,
    "policy_error": PolicyDenied,
    "rate_limited": RateLimited,
    "too_many_in_flight": RateLimited,
    "too_many_sessions": RateLimited,
    "too_many_messages": RateLimited,
    "queue_full": Unavailable,
    "shutting_down": Unavailable,
    "overloaded": Unavailable,
    "unavailable": Unavailable,
    "model_changed": Unavailable,
    "quota_unavailable": Unavailable,
    "store_unavailable": Unavailable,
    "request_timeout": DeadlineExceeded,
    "deadline_exceeded": DeadlineExceeded,
    "inference_failed": ServerError,
    "internal": ServerError,
}

_BY_STATUS = {401: Unauthorized, 403: Forbidden, 404: NotFound, 408: DeadlineExceeded, 422: InvalidRequest,
              429: RateLimited, 503: Unavailable, 504: DeadlineExceeded}


def _class_name(code):
    return "".join(part.capitalize() for part in code.split("_"))


#: code -> exception class (`StateLengthMismatch`, `RateLimited`, ...).
BY_CODE = {}
for _code, _family in _CODES.items():
    _name = _class_name(_code)
    if _name == _family.__name__:
        BY_CODE[_code] = _family
        continue
    _cls = type(_name, (_family,), {"__doc__": f"`{_code}` ({_family.__name__})."})
    globals()[_name] = _cls
    BY_CODE[_code] = _cls


def from_answer(status, body, retry_after=None):
    """The exception for an error answer: by its code, else by its status."""
    code = body.get("code") if isinstance(body, dict) else None
    message = body.get("error", "") if isinstance(body, dict) else str(body)
    if code in BY_CODE:
        cls = BY_CODE[code]
    elif status in _BY_STATUS:
        cls = _BY_STATUS[status]
    elif 400 <= status < 500:
        cls = InvalidRequest
    else:
        cls = ServerError
    return cls(message or f"HTTP {status}", code=code, status=status, retry_after=retry_after, body=body)
