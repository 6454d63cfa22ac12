"""Retry policy: which failures may be repeated, and how long to wait before the next try.

Only errors whose ``retryable`` flag is set (``overloaded``, ``timeout``, ``unavailable``,
``internal``; a lost connection surfaces as ``unavailable``) are retried, and always with the
idempotency key of the first attempt, so a call that did commit is answered from its stored
result instead of being applied twice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .._errors import ConfigError, FacetrtError


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """``retries`` more attempts after the first, spaced by capped exponential backoff.

    The wait before retry ``n`` (0-based) is ``min(backoff_seconds_max, backoff_seconds *
    2**n)``, of which the upper half is random ("equal jitter"): clients that failed together
    spread out, yet none retries at once.
    """

    retries: int = 3
    backoff_seconds: float = 0.05
    backoff_seconds_max: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.retries <= 100:
            raise ConfigError(f"retries must be in 0..100, got {self.retries!r}")
        if not 0 <= self.backoff_seconds <= self.backoff_seconds_max <= 3600:
            raise ConfigError(
                "need 0 <= backoff_seconds <= backoff_seconds_max <= 3600, got "
                f"{self.backoff_seconds!r} and {self.backoff_seconds_max!r}"
            )

    def should_retry(self, error: FacetrtError, retry: int) -> bool:
        """Whether retry number ``retry`` (0-based) may follow ``error``."""
        return error.retryable and retry < self.retries

    def delay_seconds(self, retry: int, *, rng: random.Random | None = None) -> float:
        """The wait before retry number ``retry`` (0-based)."""
        ceiling = min(self.backoff_seconds_max, self.backoff_seconds * 2.0 ** min(retry, 62))
        jitter = random.uniform if rng is None else rng.uniform
        return ceiling / 2 + jitter(0.0, ceiling / 2)
