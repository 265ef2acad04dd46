"""Operator routes over accounts: ``GET|PUT /api/v1/admin/accounts/{name}/limits``.

Only an operator reaches them (api/operators.py: the admin token, or loopback
when FLOWPOOL_ADMIN_TOKEN is unset). Accounts are named as `flowpool accounts
create` named them. A limit the operator never set, or set back to null,
follows its FLOWPOOL_DEFAULT_* setting; 0 means no limit.
"""
from __future__ import annotations

from typing import Any, Optional

from flask import Blueprint, jsonify
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from flowpool.errors import NotFound, RequestError
from flowpool.limits import LIMIT_NAMES, MAX_LIMIT, Limits
from flowpool.registry import Account

from .operators import require_operator
from .parsing import json_body, model_from
from .services import services

bp = Blueprint("admin", __name__, url_prefix="/api/v1/admin")

_LIMIT = Field(None, ge=0, le=MAX_LIMIT)


class LimitsUpdate(BaseModel):
    """The limits to change: an integer >= 0 (0: no limit) gives the account its own value, null puts it back to the
    default; a limit left out stays as it is."""

    model_config = ConfigDict(extra="forbid")

    concurrency: Optional[StrictInt] = _LIMIT
    rpm: Optional[StrictInt] = _LIMIT
    tokens_per_day: Optional[StrictInt] = _LIMIT
    compute_seconds_per_day: Optional[StrictInt] = _LIMIT


def _account(name: str) -> Account:
    account = services().accounts.find(name)
    if account is None:
        raise NotFound(f"no account named {name!r}: create it with `flowpool accounts create NAME`", param="name")
    return account


def _answer(account: Account, limits: Limits, own: frozenset[str]) -> Any:
    return jsonify({"data": {"account": account.name, "limits": limits.to_dict(),
                             "defaults": [name for name in LIMIT_NAMES if name not in own]}})


@bp.get("/accounts/<name>/limits")
def get_limits(name: str):  # type: ignore[no-untyped-def]
    """The account's limits, and which of them follow the defaults."""
    require_operator()
    account = _account(name)
    return _answer(account, *services().limits.get(account.id))


@bp.put("/accounts/<name>/limits")
def put_limits(name: str):  # type: ignore[no-untyped-def]
    """Set some of the account's limits (null: back to the default); answers them all."""
    require_operator()
    account = _account(name)
    update = model_from(LimitsUpdate, json_body())
    if not update.model_fields_set:
        raise RequestError(f"the body names no limit: send at least one of {', '.join(LIMIT_NAMES)}", param="body")
    changes = {field: getattr(update, field) for field in update.model_fields_set}
    return _answer(account, *services().limits.set(account.id, **changes))
