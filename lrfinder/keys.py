"""API keys: creation, lookup, listing and revocation.

A key is a random secret shown once at creation. The store keeps only its
SHA-256 hash, as a field of the ``apikeys`` hash (layout in lrfinder.store),
so a copy of the Redis data gives no usable key. The key table has no TTL:
a key lives until it is revoked. A lookup hashes the key
presented, fetches the record by that hash and confirms the hash stored in
the record with ``hmac.compare_digest``. No comparison ever reads the key
itself.

Several keys may share a name, which is how keys are rotated: create a new
key, then revoke the old one by its id. Jobs belong to the name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from lrfinder.store import Store

Role = Literal["user", "admin"]
ROLES: tuple[str, ...] = ("user", "admin")

# A key id is this many leading hex digits of the key's hash: enough to tell
# keys apart in a listing, useless for authenticating.
KEY_ID_LENGTH = 12
KEY_PREFIX = "lrf_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@dataclass
class KeyRecord:
    """Stored record of one API key (never the key itself)."""

    id: str
    name: str
    role: str
    created_at: float
    revoked: bool = False
    revoked_at: float | None = None

    def public(self) -> dict[str, Any]:
        """Describe the key for listings."""
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "created_at": self.created_at,
            "revoked": self.revoked,
            "revoked_at": self.revoked_at,
        }


def hash_api_key(key: str) -> str:
    """Return the hex SHA-256 of an API key, the form the store keeps."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _record_from_json(key_hash: str, text: str) -> KeyRecord:
    values = json.loads(text)
    return KeyRecord(
        id=key_hash[:KEY_ID_LENGTH],
        name=str(values["name"]),
        role=str(values.get("role", "user")),
        created_at=float(values.get("created_at", 0.0)),
        revoked=bool(values.get("revoked", False)),
        revoked_at=values.get("revoked_at"),
    )


def validate_name(name: str) -> None:
    """Raise ValueError unless ``name`` can own keys and jobs."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"key name {name!r} is invalid: use 1 to 64 letters, digits, "
            "'.', '_', '@' or '-', starting with a letter or digit"
        )


def create_key(store: Store, name: str, role: str = "user") -> tuple[str, KeyRecord]:
    """Create a key for ``name`` and return the secret with its record.

    The secret is returned only here; show it once and keep no copy.
    """
    validate_name(name)
    if role not in ROLES:
        raise ValueError(f"role {role!r} is invalid: use one of {', '.join(ROLES)}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_hash = hash_api_key(key)
    values = {
        "name": name,
        "role": role,
        "created_at": time.time(),
        "revoked": False,
        "key_hash": key_hash,
    }
    text = json.dumps(values)
    store.redis.hset(store.key("apikeys"), key_hash, text)
    return key, _record_from_json(key_hash, text)


def find_key(store: Store, key: str) -> KeyRecord | None:
    """Return the record of ``key``, revoked or not, or None if it is unknown."""
    if not key or len(key) > 512:
        return None
    key_hash = hash_api_key(key)
    text = store.redis.hget(store.key("apikeys"), key_hash)
    if text is None:
        return None
    stored_hash = json.loads(text).get("key_hash", key_hash)
    if not hmac.compare_digest(str(stored_hash), key_hash):
        return None
    return _record_from_json(key_hash, text)


def list_keys(store: Store) -> list[KeyRecord]:
    """Return every key record, oldest first."""
    texts = store.redis.hgetall(store.key("apikeys"))
    records = [_record_from_json(key_hash, text) for key_hash, text in texts.items()]
    return sorted(records, key=lambda record: record.created_at)


def revoke_key(store: Store, name_or_id: str) -> list[KeyRecord]:
    """Revoke the keys whose id or name is ``name_or_id`` and return them.

    Revoking by name revokes every key of that name. Keys revoked before are
    left as they are and not returned.
    """
    revoked = []
    texts = store.redis.hgetall(store.key("apikeys"))
    for key_hash, text in texts.items():
        record = _record_from_json(key_hash, text)
        if record.revoked or name_or_id not in (record.id, record.name):
            continue
        values = json.loads(text)
        values.update(revoked=True, revoked_at=time.time())
        store.redis.hset(store.key("apikeys"), key_hash, json.dumps(values))
        record.revoked, record.revoked_at = True, values["revoked_at"]
        revoked.append(record)
    return revoked
