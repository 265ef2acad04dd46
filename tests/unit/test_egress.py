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


def test_a_connection_goes_to_the_checked_address_and_a_name_resolving_to_a_refused_one_never_connects(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A name whose DNS answer is 127.0.0.2 is refused at connect time, redirects included.

    The DNS answer is injected (no resolver here can be made to give it for
    real); the server listens on 127.0.0.1 and must see nothing.
    """
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from flowpool.egress import guarded_session

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.path)
            target = "http://rebound.test:%d/inside" % self.server.server_address[1]
            self.send_response(302 if self.path == "/hop" else 200)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    real = socket.getaddrinfo

    def fake_getaddrinfo(host: str, *args: object, **kwargs: object) -> object:
        if host == "rebound.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port))]
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    session = guarded_session(EgressPolicy("127.0.0.1/32"))
    try:
        with pytest.raises(EgressDenied, match="127.0.0.2"):
            session.get(f"http://rebound.test:{port}/direct", timeout=5)
        with pytest.raises(EgressDenied, match="127.0.0.2"):
            session.get(f"http://127.0.0.1:{port}/hop", timeout=5)  # allowed, then redirected to the name
        assert seen == ["/hop"]
    finally:
        server.shutdown()
        server.server_close()
