"""``flowpool accounts``: accounts and their API keys, written straight to the registry's Redis."""
from __future__ import annotations

import click

from .common import load_cli_settings, server_extra

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
    with server_extra("accounts create"):
        import redis

        from ..connections import connect_redis
        from ..registry import Accounts

    loaded = load_cli_settings()
    where, warning = loaded.redis_source()
    if warning:
        click.echo(f"warning: {warning}", err=True)
    # On stderr, as everything but the key: a script reads the key alone from stdout.
    click.echo(f"Redis: {where}", err=True)
    client = connect_redis(loaded.settings)
    try:
        account, key, created = Accounts(client).create(name)
    except redis.RedisError as exc:
        raise click.ClickException(f"Redis {where}: {exc}") from exc
    finally:
        client.close()
    click.echo(f"{'created account' if created else 'new key for account'} {account.name} ({account.id})", err=True)
    click.echo(key)


COMMANDS = [accounts]
