"""Reading a server-sent event stream of JSON ``data:`` lines that ends with ``data: [DONE]``."""
from __future__ import annotations

import json
from typing import Any, Iterator

import requests

__all__ = ["sse_data"]


def sse_data(response: requests.Response) -> Iterator[Any]:
    """The JSON value of each ``data:`` line as it arrives, until ``[DONE]``; other lines are passed over.

    A line that is not JSON raises ValueError.
    """
    for line in response.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)
