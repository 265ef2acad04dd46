"""The ``flowpool`` command line: one click group, its commands in a module per concern.

- :mod:`.serve`: ``dev``, ``api``, ``worker`` (the server extra);
- :mod:`.doctor`: ``doctor``;
- :mod:`.pool`: ``pool`` (the demand signal; the client alone);
- :mod:`.accounts`: ``accounts``;
- :mod:`.workflows`: ``push``, ``activate``, ``validate``, ``invoke``, ``runs``, ``logs`` (the client alone);
- :mod:`.local`: ``init``, ``run`` (the client alone, but for the temporary stack ``run`` may start);
- :mod:`.datastores`: ``datastore create|list|get|ingest|search|delete`` (the client alone);
- :mod:`.usage`: ``usage`` (the client alone).

Each module imports only click and the client at its top; what the server
extra brings is imported inside the command that needs it.
"""
from __future__ import annotations

import click

from . import accounts, datastores, doctor, local, pool, serve, usage, workflows

__all__ = ["main"]


@click.group()
def main() -> None:
    """flowpool: multi-step AI workflows as one API call."""


for _module in (serve, doctor, accounts, workflows, local, datastores, pool, usage):
    for _command in _module.COMMANDS:
        main.add_command(_command)
