"""Each account's limits: the operator's own values over the FLOWPOOL_DEFAULT_* settings.

An account's own values live in one Redis hash (``keys.account_limits``), one
integer field per limit; a field that is not there takes the setting's
default, so changing a default reaches every account that has no value of its
own. 0 means no limit. Admission reads the same hash inside its Lua script
(``run_scripts`` BEGIN), so a change applies to the next request on every API
process at once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

import redis

from flowpool import keys
from flowpool.settings import Settings

__all__ = ["LIMIT_NAMES", "MAX_LIMIT", "LimitStore", "Limits"]

# The largest value a limit may take: far past any real one, and exact as a Lua number (a double) in BEGIN.
MAX_LIMIT = 10**12


@dataclass(frozen=True)
class Limits:
    """An account's limits; 0 for none."""

    concurrency: int = 0              # runs queued or running at once
    rpm: int = 0                      # requests per minute (a burst of this many, then one every 60/rpm s)
    tokens_per_day: int = 0           # model-call tokens per UTC day
    compute_seconds_per_day: int = 0  # seconds of worker slots per UTC day

    @classmethod
    def defaults(cls, settings: Settings) -> Limits:
        """The limits of an account with none of its own: the FLOWPOOL_DEFAULT_* settings."""
        return cls(concurrency=settings.default_concurrency, rpm=settings.default_rpm,
                   tokens_per_day=settings.default_tokens_per_day,
                   compute_seconds_per_day=settings.default_compute_seconds_per_day)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


LIMIT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Limits))


class LimitStore:
    """Read and set accounts' limits in the registry's Redis."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.defaults = Limits.defaults(settings)

    def get(self, account_id: str) -> tuple[Limits, frozenset[str]]:
        """The account's effective limits, and the names of those that are its own (the rest are the defaults)."""
        stored = self.redis.hmget(keys.account_limits(account_id), LIMIT_NAMES)
        own = {name: int(value) for name, value in zip(LIMIT_NAMES, stored) if value is not None}
        return Limits(**{**self.defaults.to_dict(), **own}), frozenset(own)

    def set(self, account_id: str, **values: Optional[int]) -> tuple[Limits, frozenset[str]]:
        """Give the account its own value for each limit named; None puts that limit back to the default.

        Limits not named are left as they are. Returns what ``get`` then answers.
        """
        unknown = sorted(set(values) - set(LIMIT_NAMES))
        if unknown:
            raise ValueError(f"unknown limit {unknown[0]!r}: the limits are {', '.join(LIMIT_NAMES)}")
        for name, value in values.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT):
                raise ValueError(f"{name} must be an integer from 0 (no limit) to {MAX_LIMIT}, or None for the "
                                 f"default, got {value!r}")
        key = keys.account_limits(account_id)
        own = {name: value for name, value in values.items() if value is not None}
        back_to_default = [name for name, value in values.items() if value is None]
        pipe = self.redis.pipeline(transaction=True)
        if own:
            pipe.hset(key, mapping=own)
        if back_to_default:
            pipe.hdel(key, *back_to_default)
        pipe.execute()
        return self.get(account_id)
