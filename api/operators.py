"""Who may use the operator routes (GET /api/v1/pool, the admin routes): the admin token's holder, or loopback.

With ``FLOWPOOL_ADMIN_TOKEN`` set, a request must carry it as a bearer token
(401 otherwise, compared in constant time). Unset, only a request whose
remote address is loopback is answered (403 otherwise), so `flowpool dev`
needs no token; behind a proxy on the same host every request looks local,
which is why such a deployment must set the token.
"""
from __future__ import annotations

import hmac
import ipaddress

from flask import request

from flowpool.errors import AuthenticationError, PermissionDenied

from .services import bearer_token, services

__all__ = ["is_loopback", "require_operator"]


def is_loopback(address: str | None) -> bool:
    """Whether ``address`` is a loopback IP address (an IPv4-mapped IPv6 one included); False for anything else."""
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def require_operator() -> None:
    """Refuse the request unless it carries the admin token, or (with none set) comes from loopback."""
    expected = services().settings.admin_token
    if expected is not None:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None or not hmac.compare_digest(token.encode(), expected.encode()):
            raise AuthenticationError(f"{request.path} is an operator route: send "
                                      "Authorization: Bearer <FLOWPOOL_ADMIN_TOKEN>")
        return
    if not is_loopback(request.remote_addr):
        raise PermissionDenied(f"{request.path} is an operator route and FLOWPOOL_ADMIN_TOKEN is unset, so it answers "
                               "only requests from loopback: set FLOWPOOL_ADMIN_TOKEN on the API and send it as "
                               "Authorization: Bearer <token>")
