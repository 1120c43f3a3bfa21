"""Who is asking: API-key authentication and the client identity limits are counted by."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from functools import cached_property

from fastapi import Request

from shared.errors import Unauthorized
from shared.settings import Settings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Client:
    """A caller, named by its API key (hashed, never stored) or else its address."""

    id: str
    admin: bool = False
    """Called with one of `MLXQ_ADMIN_KEYS`."""

    def sees(self, owner: str | None) -> bool:
        """Whether this client may read or cancel what `owner` (a client tag) submitted: with API keys,
        only its own (admins all); without, everyone's, since an address is no proof of identity."""
        return self.admin or not self.id.startswith("key:") or owner == self.tag

    @cached_property
    def tag(self) -> str:
        """A short name for the client in batch-tier keys (never the address or key itself)."""
        return hashlib.sha256(self.id.encode()).hexdigest()[:12]


class ClientResolver:
    """Authenticates requests and names their client, by the settings' keys and proxies."""

    def __init__(self, settings: Settings) -> None:
        self._keys = [key.encode() for key in [*settings.api_keys, *settings.admin_keys]]
        self._admin_keys = [key.encode() for key in settings.admin_keys]
        self._proxy_specs = settings.trusted_proxies

    @cached_property
    def _proxies(self) -> list[Network]:
        return [ipaddress.ip_network(spec, strict=False) for spec in self._proxy_specs]

    @property
    def auth_required(self) -> bool:
        return bool(self._keys)

    def resolve(self, request: Request) -> Client:
        if self._keys:
            key = self._bearer(request)
            # Compare against every key in constant time, so timing says nothing about near misses.
            if key is None or not any([hmac.compare_digest(key, known) for known in self._keys]):
                raise Unauthorized("A valid API key is required: send `Authorization: Bearer <key>`")
            admin = any([hmac.compare_digest(key, known) for known in self._admin_keys])
            return Client(id="key:" + hashlib.sha256(key).hexdigest()[:16], admin=admin)
        return Client(id="ip:" + self.address(request))

    def address(self, request: Request) -> str:
        """The caller's address; X-Forwarded-For counts only when it comes from a trusted proxy."""
        peer = request.client.host if request.client else "unknown"
        if not self._trusted(peer):
            return peer
        forwarded = [hop.strip() for hop in request.headers.get("x-forwarded-for", "").split(",") if hop.strip()]
        # Walk back from the nearest hop: the first address we do not trust is the client.
        for hop in reversed(forwarded):
            if not self._trusted(hop):
                return hop
        return forwarded[0] if forwarded else peer

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._proxies)

    @staticmethod
    def _bearer(request: Request) -> bytes | None:
        """The API key: `Authorization: Bearer <key>`, or `x-api-key` (what Anthropic's SDK sends)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            token = request.headers.get("x-api-key", "")
        return token.strip().encode() if token.strip() else None
