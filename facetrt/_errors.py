"""The whole exception hierarchy of facetrt.

Every failure that reaches a caller carries one ``code`` from the closed set of SPEC §4, a
message and a ``retryable`` flag. Python users catch these classes; the wire and HTTP surfaces
translate them through :data:`ERROR_CLASSES` (code -> class), the one table that maps codes.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ErrorCode(enum.StrEnum):
    """The closed set of error codes a caller can see (SPEC §4)."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    HANDLER_ERROR = "handler_error"
    REENTRANCY = "reentrancy"
    QUOTA_EXCEEDED = "quota_exceeded"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    POLICY_VIOLATION = "policy_violation"
    INTERNAL = "internal"


class FacetrtError(Exception):
    """Base of every error facetrt raises on purpose.

    Attributes:
        code: the SPEC §4 error code.
        retryable: whether the same call may succeed if repeated (with the same idempotency key).
        message: a human-readable explanation; never contains stored values or secrets.
    """

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class BadRequestError(FacetrtError):
    """Raised when a frame, id, argument or value breaks the rules; nothing was changed.

    The caller must fix the request; repeating it fails the same way.
    """

    code = ErrorCode.BAD_REQUEST


class AddressError(BadRequestError, ValueError):
    """Raised when a tenant or agent id does not match SPEC §2."""


class ConfigError(BadRequestError, ValueError):
    """Raised at startup when settings are invalid (bad values, data directory locked)."""


class ProtocolError(BadRequestError):
    """A wire-protocol violation; never raised directly (see the two subclasses)."""


class LocalProtocolError(ProtocolError):
    """Raised when we tried to send something the protocol does not allow: a bug."""


class RemoteProtocolError(ProtocolError):
    """Raised when the peer sent something illegal; that connection must be closed."""


class UnauthorizedError(FacetrtError):
    """Raised when a credential is missing or wrong."""

    code = ErrorCode.UNAUTHORIZED


class ForbiddenError(FacetrtError):
    """Raised when a valid credential is not allowed this tenant or operation."""

    code = ErrorCode.FORBIDDEN


class NotFoundError(FacetrtError):
    """Raised for an unknown facet (when no class was given), class or method."""

    code = ErrorCode.NOT_FOUND


class ConflictError(FacetrtError):
    """Raised when a call names a class other than the one the facet is bound to."""

    code = ErrorCode.CONFLICT


class HandlerError(FacetrtError):
    """Raised when the facet's own code raised; its writes were discarded.

    Attributes:
        type_name: the name of the exception class the handler raised.
    """

    code = ErrorCode.HANDLER_ERROR

    def __init__(self, message: str, *, type_name: str = "Exception") -> None:
        super().__init__(message)
        self.type_name = type_name


class ReentrancyError(FacetrtError):
    """Raised at once when a facet call would re-enter a facet already on its call chain, or
    would close a cycle of facets each awaiting the next one's reply (separate call chains).

    Waiting instead would deadlock: the facet called is busy with a message that is
    (transitively) waiting for this call's caller.
    """

    code = ErrorCode.REENTRANCY


class QuotaExceededError(FacetrtError):
    """Raised when a storage, facet-count or rate quota of the tenant is reached."""

    code = ErrorCode.QUOTA_EXCEEDED


class StoreFullError(QuotaExceededError):
    """Raised when a facet's store reached ``map_size_bytes_max``; the batch was not written."""


class OverloadedError(FacetrtError):
    """Raised when a bounded queue is full; the message was shed before being queued.

    Retry later, with backoff.
    """

    code = ErrorCode.OVERLOADED
    retryable = True


class DeadlineExceededError(FacetrtError):
    """Raised when a call's deadline passed; its writes may or may not have committed.

    Retry with the same idempotency key to learn the outcome without applying it twice.
    """

    code = ErrorCode.TIMEOUT
    retryable = True


class UnavailableError(FacetrtError):
    """Raised when the runtime is starting, draining or closed, or does not own the facet."""

    code = ErrorCode.UNAVAILABLE
    retryable = True


class ActorDeadError(UnavailableError):
    """Raised when an activation stopped before it handled the envelope (nothing was applied)."""


class PolicyViolationError(FacetrtError):
    """Raised when an egress or tool call was denied by policy."""

    code = ErrorCode.POLICY_VIOLATION


class InternalError(FacetrtError):
    """Raised for a bug or a storage failure; the facet was reset from disk.

    Nothing of the failed batch was acknowledged; a retry (with the same idempotency key) is safe.
    """

    code = ErrorCode.INTERNAL
    retryable = True


class StorageError(InternalError):
    """Raised when LMDB failed (commit, open, read); always chained from the ``lmdb.Error``."""


ERROR_CLASSES: dict[ErrorCode, type[FacetrtError]] = {
    ErrorCode.BAD_REQUEST: BadRequestError,
    ErrorCode.UNAUTHORIZED: UnauthorizedError,
    ErrorCode.FORBIDDEN: ForbiddenError,
    ErrorCode.NOT_FOUND: NotFoundError,
    ErrorCode.CONFLICT: ConflictError,
    ErrorCode.HANDLER_ERROR: HandlerError,
    ErrorCode.REENTRANCY: ReentrancyError,
    ErrorCode.QUOTA_EXCEEDED: QuotaExceededError,
    ErrorCode.OVERLOADED: OverloadedError,
    ErrorCode.TIMEOUT: DeadlineExceededError,
    ErrorCode.UNAVAILABLE: UnavailableError,
    ErrorCode.POLICY_VIOLATION: PolicyViolationError,
    ErrorCode.INTERNAL: InternalError,
}
