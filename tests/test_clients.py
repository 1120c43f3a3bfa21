"""Client identity and API keys, on Starlette requests built by hand."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from gateway.admission.admit import RateState
from gateway.admission.clients import ClientResolver
from shared.errors import Unauthorized
from shared.settings import Settings


def request(peer: str = "203.0.113.9", **headers: str) -> Request:
    raw = [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/v1/jobs", "headers": raw, "client": (peer, 5000)})


def test_without_keys_the_client_is_its_address() -> None:
    assert ClientResolver(Settings()).resolve(request()).id == "ip:203.0.113.9"


def test_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    resolver = ClientResolver(Settings())
    assert resolver.resolve(request(x_forwarded_for="198.51.100.7")).id == "ip:203.0.113.9"


def test_forwarded_for_from_a_trusted_proxy_names_the_first_untrusted_hop() -> None:
    resolver = ClientResolver(Settings(trusted_proxies=["10.0.0.0/8", "203.0.113.9"]))
    forwarded = request(x_forwarded_for="198.51.100.7, 10.1.2.3")
    assert resolver.resolve(forwarded).id == "ip:198.51.100.7"
    # A spoofed hop to the left of the real client changes nothing.
    spoofed = request(x_forwarded_for="1.2.3.4, 198.51.100.7, 10.1.2.3")
    assert resolver.resolve(spoofed).id == "ip:198.51.100.7"


def test_trusted_proxies_and_keys_parse_from_comma_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLXQ_API_KEYS", "k1, k2")
    monkeypatch.setenv("MLXQ_TRUSTED_PROXIES", "127.0.0.1,10.0.0.0/8")
    settings = Settings()
    assert settings.api_keys == ["k1", "k2"]
    assert settings.trusted_proxies == ["127.0.0.1", "10.0.0.0/8"]


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic k1", "Bearer "])
def test_with_keys_a_missing_or_wrong_key_is_401(header: str | None) -> None:
    resolver = ClientResolver(Settings(api_keys=["k1"]))
    headers = {"authorization": header} if header is not None else {}
    with pytest.raises(Unauthorized) as caught:
        resolver.resolve(request(**headers))
    assert caught.value.status_code == 401
    assert caught.value.headers()["WWW-Authenticate"] == "Bearer"


def test_with_keys_the_client_is_the_key_hashed_not_the_address() -> None:
    resolver = ClientResolver(Settings(api_keys=["k1", "k2"]))
    one = resolver.resolve(request(peer="10.0.0.1", authorization="Bearer k1"))
    same = resolver.resolve(request(peer="10.0.0.2", authorization="Bearer k1"))
    other = resolver.resolve(request(peer="10.0.0.1", authorization="Bearer k2"))
    assert one == same != other
    assert "k1" not in one.id


def test_rate_headers_use_openai_names_and_durations() -> None:
    headers = RateState(limit=30, remaining=12, reset_s=361.2).headers()
    assert headers == {
        "x-ratelimit-limit-requests": "30",
        "x-ratelimit-remaining-requests": "12",
        "x-ratelimit-reset-requests": "6m2s",
    }
