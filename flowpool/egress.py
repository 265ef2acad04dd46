"""Which outbound addresses a run may reach through the worker (model providers, agents, ctx.http).

Loopback, private, link-local, carrier-grade NAT, unique-local, reserved and
cloud-metadata addresses are refused unless the operator lists them (CIDRs or
host names) in ``FLOWPOOL_EGRESS_ALLOW``. A host name is checked on every
address it resolves to, so a public name pointing at 127.0.0.1 is refused too.
"""
from __future__ import annotations

import ipaddress
import socket
from http.cookiejar import DefaultCookiePolicy
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from flowpool.settings import split_list

__all__ = ["EgressDenied", "EgressPolicy", "guarded_session"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_METADATA = [ipaddress.ip_network(n) for n in ("169.254.169.254/32", "fd00:ec2::254/128", "100.100.100.200/32")]
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


class EgressDenied(Exception):
    """The address is not one a run may reach."""


class EgressPolicy:
    """The operator's allow list, and the check of a URL against it."""

    def __init__(self, allow: str | list[str] = "") -> None:
        items = split_list(allow) if isinstance(allow, str) else [a.strip() for a in allow if a.strip()]
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.hosts: set[str] = set()
        for item in items:
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.hosts.add(item.lower().rstrip("."))

    @staticmethod
    def forbidden(address: IPAddress) -> str | None:
        """Why ``address`` is refused by default, or None for a public address."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in n for n in _METADATA if n.version == address.version):
            return "a cloud metadata address"
        for test, why in ((address.is_loopback, "loopback"), (address.is_unspecified, "unspecified"),
                          (address.is_link_local, "link-local"), (address.is_multicast, "multicast"),
                          (address.is_private, "private"), (address.is_reserved, "reserved")):
            if test:
                return f"a {why} address"
        if address.version == 4 and address in _CGNAT:
            return "a carrier-grade NAT address"
        return None

    def allowed(self, address: IPAddress) -> bool:
        return any(address in n for n in self.networks if n.version == address.version)

    def check_address(self, address: IPAddress, host: str) -> None:
        """Raise EgressDenied when ``address`` (which ``host`` resolved to) may not be reached."""
        why = self.forbidden(address)
        if why is not None and not self.allowed(address):
            raise EgressDenied(f"{host} resolves to {address}, {why}; the operator can allow it in "
                               "FLOWPOOL_EGRESS_ALLOW")

    def check_url(self, url: str) -> list[IPAddress]:
        """Resolve the URL's host and check every address; returns them."""
        try:
            parts = urlsplit(url)
            port = parts.port  # a port that is not a number from 0 to 65535 raises ValueError
        except ValueError as exc:
            raise EgressDenied(f"not a URL that can be reached ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EgressDenied(f"only http and https URLs with a host can be reached, not {url!r}")
        return self.check_host(parts.hostname, port or (443 if parts.scheme == "https" else 80))

    def check_host(self, host: str, port: int) -> list[IPAddress]:
        """Resolve ``host`` and check every address it resolves to; returns them."""
        host = host.lower().rstrip(".").strip("[]")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise EgressDenied(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        if host in self.hosts:
            return addresses
        for address in addresses:
            self.check_address(address, host)
        return addresses


class _GuardedConnection:
    """A urllib3 connection that resolves and checks its host itself, then connects to the checked address.

    Checking at connect time covers every redirect and defeats a name that
    resolves to a public address when checked and a private one when used:
    the socket goes to the address that passed. TLS still verifies the name.
    """

    policy: EgressPolicy

    def _new_conn(self) -> socket.socket:
        addresses = self.policy.check_host(self.host, self.port)  # type: ignore[attr-defined]
        self._dns_host = str(addresses[0])
        return super()._new_conn()  # type: ignore[misc]


def guarded_session(policy: EgressPolicy, max_redirects: int = 5) -> requests.Session:
    """A requests session whose every connection passes ``policy``; no proxies from the environment, no cookies.

    Its connection pools (urllib3's) are safe to share between threads, and
    sharing them keeps connections to providers warm across runs.
    """
    http_conn = type("GuardedHTTPConnection", (_GuardedConnection, HTTPConnection), {"policy": policy})
    https_conn = type("GuardedHTTPSConnection", (_GuardedConnection, HTTPSConnection), {"policy": policy})
    pools = {
        "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
        "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
    }

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

    session = requests.Session()
    session.trust_env = False
    session.max_redirects = max_redirects
    # Shared by every run of a worker: no cookie may carry over from one run to another.
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    adapter = GuardedAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
