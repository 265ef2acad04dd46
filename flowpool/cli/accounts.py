"""``flowpool accounts``: accounts and their API keys, written straight to the registry's Redis."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import click

from .common import echo_json, load_cli_settings, server_extra

__all__ = ["COMMANDS"]


@click.group()
def accounts() -> None:
    """Accounts and API keys."""


@accounts.command("create")
@click.argument("name")
def accounts_create(name: str) -> None:
    """Create account NAME (or add a key to it) and print a new API key.

    It writes to the Redis of FLOWPOOL_REDIS_URL, else to that of the `flowpool dev` running on
    FLOWPOOL_DATA_DIR (default .flowpool here), else to the default redis://127.0.0.1:6379/0; it says which.
    """
    # Everything but the key goes to stderr: a script reads the key alone from stdout.
    with _registry("accounts create") as (client, _):
        from ..registry import Accounts

        account, key, created = Accounts(client).create(name)
    click.echo(f"{'created account' if created else 'new key for account'} {account.name} ({account.id})", err=True)
    click.echo(key)


@contextmanager
def _registry(command: str) -> Iterator[tuple[Any, Any]]:
    """A client of the registry's Redis (said on stderr, as `accounts create` does) and the settings; a Redis
    error ends the command in one line."""
    with server_extra(command):
        import redis

        from ..connections import connect_redis

    loaded = load_cli_settings()
    where, warning = loaded.redis_source()
    if warning:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"Redis: {where}", err=True)
    client = connect_redis(loaded.settings)
    try:
        yield client, loaded.settings
    except redis.RedisError as exc:
        raise click.ClickException(f"Redis {where}: {exc}") from exc
    finally:
        client.close()


def _find(client: Any, name: str) -> Any:
    from ..registry import Accounts

    account = Accounts(client).find(name)
    if account is None:
        raise click.ClickException(f"no account named {name!r}: create it with `flowpool accounts create NAME`")
    return account


class _LimitValue(click.ParamType):
    """An integer >= 0 (0: no limit), or ``default``: back to the FLOWPOOL_DEFAULT_* setting."""

    name = "N|default"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        from ..limits import MAX_LIMIT

        if value is None or isinstance(value, int) or value == "default":
            return value
        try:
            number = int(value)
        except ValueError:
            number = -1
        if not 0 <= number <= MAX_LIMIT:
            self.fail(f"{value!r} is neither an integer from 0 (no limit) to {MAX_LIMIT} nor 'default'", param, ctx)
        return number


def _limit_option(name: str, what: str) -> Any:
    return click.option(f"--{name.replace('_', '-')}", name, type=_LimitValue(), default=None,
                        help=f"{what}; 0: no limit; 'default': FLOWPOOL_DEFAULT_{name.upper()}.")


@accounts.command("limits")
@click.argument("name")
@_limit_option("concurrency", "Runs queued or running at once")
@_limit_option("rpm", "Requests per minute")
@_limit_option("tokens_per_day", "Model-call tokens per UTC day")
@_limit_option("compute_seconds_per_day", "Seconds of worker slots per UTC day")
@click.option("--json", "as_json", is_flag=True, help="Print what GET /api/v1/admin/accounts/NAME/limits answers.")
def accounts_limits(name: str, as_json: bool, **values: Any) -> None:
    """Show the limits of account NAME, or set those given (over them its requests are answered 429).

    Writes to the Redis that `accounts create` writes to; every API process
    applies a change to the next request. A limit set to 'default' (or never
    set) follows the API's FLOWPOOL_DEFAULT_* setting: the value shown for it
    is the setting in this command's environment, which may differ from the API's.
    """
    changes = {field: (None if value == "default" else value) for field, value in values.items() if value is not None}
    with _registry("accounts limits") as (client, settings):
        from ..limits import LIMIT_NAMES, LimitStore

        account = _find(client, name)
        store = LimitStore(client, settings)
        limits, own = store.set(account.id, **changes) if changes else store.get(account.id)
    if changes:
        click.echo(f"set {', '.join(changes)} of account {account.name} ({account.id})", err=True)
    shown = limits.to_dict()
    if as_json:
        echo_json({"account": account.name, "limits": shown, "defaults": [n for n in LIMIT_NAMES if n not in own]})
        return
    click.echo(f"account {account.name} ({account.id})")
    for field in LIMIT_NAMES:
        value = f"{shown[field]}" if shown[field] else "no limit"
        click.echo(f"  {field:<24} {value:<16} {'own' if field in own else 'default'}")


@accounts.command("webhook-secret")
@click.argument("name")
@click.option("--rotate", is_flag=True, help="Replace the secret with a new one (the old one stops signing).")
def accounts_webhook_secret(name: str, rotate: bool) -> None:
    """Print the secret that signs the webhooks of account NAME's runs (made on first use).

    A receiver checks X-Flowpool-Signature with it (flowpool.verify_webhook).
    The secret alone goes to stdout; everything else to stderr.
    """
    with _registry("accounts webhook-secret") as (client, _settings):
        from ..registry import Accounts

        account = _find(client, name)
        secret = Accounts(client).webhook_secret(account.id, rotate=rotate)
    click.echo(f"{'new webhook secret' if rotate else 'webhook secret'} of account {account.name} ({account.id})",
               err=True)
    click.echo(secret)


COMMANDS = [accounts]
