"""Which outbound addresses a run may reach through the worker (model providers, agents, ctx.http).

Loopback, private, link-local, carrier-grade NAT, unique-local, reserved and
cloud-metadata addresses are refused unless the operator lists them (CIDRs or
host names) in ``FLOWPOOL_EGRESS_ALLOW``. A host name is checked on every
address it resolves to, so a public name pointing at 127.0.0.1 is refused too.
"""
from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

__all__ = ["EgressDenied", "EgressPolicy"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_METADATA = [ipaddress.ip_network(n) for n in ("169.254.169.254/32", "fd00:ec2::254/128", "100.100.100.200/32")]
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


class EgressDenied(Exception):
    """The address is not one a run may reach."""


class EgressPolicy:
    """The operator's allow list, and the check of a URL against it."""

    def __init__(self, allow: str | list[str] = "") -> None:
        items = [a.strip() for a in (allow.split(",") if isinstance(allow, str) else allow) if a.strip()]
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
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EgressDenied(f"only http and https URLs with a host can be reached, not {url!r}")
        host = parts.hostname.lower().rstrip(".")
        port = parts.port or (443 if parts.scheme == "https" else 80)
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
