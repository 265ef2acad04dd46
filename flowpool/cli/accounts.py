"""``flowpool accounts``: accounts and their API keys, written straight to the registry's Redis."""
from __future__ import annotations

import click

from .common import load_settings, server_extra

__all__ = ["COMMANDS"]


@click.group()
def accounts() -> None:
    """Accounts and API keys."""


@accounts.command("create")
@click.argument("name")
def accounts_create(name: str) -> None:
    """Create account NAME (or add a key to it) and print a new API key."""
    with server_extra("accounts create"):
        from ..connections import connect_redis
        from ..registry import Accounts

    account, key, created = Accounts(connect_redis(load_settings())).create(name)
    click.echo(f"{'created account' if created else 'new key for account'} {account.name} ({account.id})", err=True)
    click.echo(key)



COMMANDS = [accounts]
