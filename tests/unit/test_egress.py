"""The outbound address check, tested on addresses alone: no test sends traffic outside loopback."""
from __future__ import annotations

import ipaddress

import pytest

from flowpool.egress import EgressDenied, EgressPolicy


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "loopback"), ("127.0.0.2", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fd00::1", "private"),
    ("169.254.169.254", "metadata"), ("169.254.10.10", "link-local"), ("fe80::1", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"), ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"),
    ("::ffff:10.0.0.1", "private"), ("fd00:ec2::254", "metadata"),
])
def test_non_public_addresses_are_refused_by_default(address: str, why: str) -> None:
    policy = EgressPolicy("")
    reason = policy.forbidden(ipaddress.ip_address(address))
    assert reason is not None and why in reason
    with pytest.raises(EgressDenied, match="FLOWPOOL_EGRESS_ALLOW"):
        policy.check_address(ipaddress.ip_address(address), "example.test")


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    EgressPolicy("").check_address(ipaddress.ip_address(address), "example.test")


def test_the_operator_allows_exactly_the_listed_networks() -> None:
    policy = EgressPolicy("127.0.0.1/32, 10.0.0.0/8")
    policy.check_address(ipaddress.ip_address("127.0.0.1"), "h")
    policy.check_address(ipaddress.ip_address("10.9.9.9"), "h")
    for refused in ("127.0.0.2", "192.168.0.1", "169.254.169.254"):
        with pytest.raises(EgressDenied):
            policy.check_address(ipaddress.ip_address(refused), "h")


def test_a_host_name_is_checked_on_every_address_it_resolves_to() -> None:
    # "localhost" resolves to loopback only: it is refused though its name looks harmless.
    with pytest.raises(EgressDenied, match="loopback"):
        EgressPolicy("").check_url("http://localhost:9/v1")


def test_an_allowed_host_name_passes_whatever_it_resolves_to() -> None:
    assert EgressPolicy("localhost").check_url("http://localhost:9/v1")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://127.0.0.1/", "http:///nohost"])
def test_only_http_urls_with_a_host_are_reachable(url: str) -> None:
    with pytest.raises(EgressDenied):
        EgressPolicy("127.0.0.1/32").check_url(url)
