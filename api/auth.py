"""Authentication: API keys, roles and the loopback-only open mode."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from fastapi import Request

from api.errors import ApiError
from lrfinder.keys import find_key
from lrfinder.settings import Settings
from lrfinder.store import Store

logger = logging.getLogger(__name__)

AUTH_MODES = ("keys", "none")
LOCAL_USER = "local"


@dataclass(frozen=True)
class Principal:
    """The caller of one request: a key's name and role."""

    name: str
    role: str = "user"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def can_see(self, owner: str | None) -> bool:
        """Tell whether this caller may read or change a job of ``owner``."""
        return self.is_admin or owner == self.name


def is_loopback(host: str) -> bool:
    """Tell whether ``host`` names the loopback interface only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_auth_settings(settings: Settings) -> None:
    """Raise ValueError for an unknown auth mode or an open server off loopback."""
    if settings.auth not in AUTH_MODES:
        raise ValueError(
            f"LRFINDER_AUTH={settings.auth!r} is invalid: use 'keys' (API keys) "
            "or 'none' (single-user mode on loopback)"
        )
    if settings.auth == "none" and not is_loopback(settings.api_host):
        raise ValueError(
            "LRFINDER_AUTH=none is allowed only on loopback, but the API would "
            f"listen on {settings.api_host!r}; bind 127.0.0.1, or create API keys "
            "with `lrfinder keys create --name NAME` and set LRFINDER_AUTH=keys"
        )


def unauthorized(message: str) -> ApiError:
    return ApiError(
        401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"}
    )


def bearer_token(request: Request) -> str:
    """Return the key of an ``Authorization: Bearer <key>`` header, or raise 401."""
    header = request.headers.get("authorization")
    if not header:
        raise unauthorized(
            "missing API key: send the header 'Authorization: Bearer <key>'"
        )
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized(
            "malformed Authorization header: use 'Authorization: Bearer <key>'"
        )
    return token.strip()


def check_local_client(request: Request) -> None:
    """Reject a request from another host reaching an open server.

    A second guard behind check_auth_settings, for a server bound to another
    address than the settings name. Clients without an IP address (the test
    client, Unix sockets) count as local.
    """
    client_host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(client_host)
    except ValueError:
        return
    if not address.is_loopback:
        raise ApiError(
            403,
            "forbidden",
            "this server runs without API keys and accepts local clients only",
        )


def local_principal(request: Request) -> Principal:
    """Return the single user of an open server; raise 403 for a remote client."""
    check_local_client(request)
    return Principal(LOCAL_USER, "admin")


def authenticate(request: Request, settings: Settings, store: Store) -> Principal:
    """Return the caller of ``request``; raise 401 unless its key is valid."""
    if settings.auth == "none":
        return local_principal(request)
    record = find_key(store, bearer_token(request))
    if record is None:
        raise unauthorized("invalid API key: check the key or ask for a new one")
    if record.revoked:
        logger.info("rejected revoked key %s of %s", record.id, record.name)
        raise unauthorized("API key revoked: ask an administrator for a new one")
    return Principal(record.name, record.role)
