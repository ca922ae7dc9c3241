"""API keys, ownership, quotas and rate limits: two users and an admin.

Runs the app through TestClient against a private redis-server. No worker
runs, so submitted jobs stay queued and count against the quota.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from lrfinder.keys import create_key, find_key, hash_api_key, list_keys, revoke_key
from lrfinder.settings import Settings
from lrfinder.store import Store
from tests.stack import RedisServer, redis_service, store  # noqa: F401
from tests.test_api import (
    VALID_SPEC,
    finish_simulated_job,
    make_image_folder,
    make_settings,
    queued_messages,
)


@pytest.fixture
def settings(redis_service: RedisServer, tmp_path: Path) -> Settings:
    return make_settings(
        redis_service.url,
        make_image_folder(tmp_path / "data" / "pets").parent,
        max_active_jobs=4,
        submissions_per_minute=10,
    )


@pytest.fixture
def client(settings: Settings, store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keys(store: Store) -> dict[str, str]:
    """Keys of two users and an admin, by name."""
    return {
        "alice": create_key(store, "alice")[0],
        "bob": create_key(store, "bob")[0],
        "root": create_key(store, "root", "admin")[0],
    }


def submit(client: TestClient, key: str) -> Any:
    return client.post("/v1/jobs", json=VALID_SPEC, headers=bearer(key))


@pytest.fixture
def alice_job(client: TestClient, keys: dict[str, str], store: Store) -> str:
    """A finished job of alice, with curves."""
    job_id = submit(client, keys["alice"]).json()["id"]
    finish_simulated_job(store, job_id, {8: 12, 4: 12})
    return job_id


# --- keys ------------------------------------------------------------------------


def redis_contents(store: Store) -> str:
    """Return every key and value of the store's Redis as one text."""
    client = store.client
    parts = []
    for name in client.scan_iter(count=1000):
        kind = client.type(name)
        if kind == "string":
            value: Any = client.get(name)
        elif kind == "hash":
            value = client.hgetall(name)
        elif kind == "list":
            value = client.lrange(name, 0, -1)
        elif kind == "set":
            value = sorted(client.smembers(name))
        elif kind == "zset":
            value = client.zrange(name, 0, -1, withscores=True)
        elif kind == "stream":
            value = client.xrange(name)
        else:
            value = f"<{kind}>"
        parts.append(f"{name} = {value!r}")
    return "\n".join(parts)


def test_keys_are_stored_only_as_hashes(store: Store, keys: dict[str, str]) -> None:
    contents = redis_contents(store)
    for key in keys.values():
        assert hash_api_key(key) in contents
        assert key not in contents


def test_find_key_returns_name_and_role(store: Store, keys: dict[str, str]) -> None:
    record = find_key(store, keys["root"])
    assert record is not None
    assert record.name == "root"
    assert record.role == "admin"


def test_find_key_unknown_is_none(store: Store, keys: dict[str, str]) -> None:
    assert find_key(store, keys["alice"] + "x") is None


def test_revoke_key_by_id_leaves_others(store: Store) -> None:
    old_key, old = create_key(store, "carol")
    new_key, _ = create_key(store, "carol")
    revoked = revoke_key(store, old.id)
    assert [record.id for record in revoked] == [old.id]
    assert find_key(store, old_key).revoked
    assert not find_key(store, new_key).revoked


def test_revoke_key_by_name_revokes_all(store: Store) -> None:
    create_key(store, "carol")
    create_key(store, "carol")
    assert len(revoke_key(store, "carol")) == 2
    assert all(record.revoked for record in list_keys(store))


def test_create_key_rejects_bad_name_and_role(store: Store) -> None:
    with pytest.raises(ValueError, match="key name"):
        create_key(store, "../alice")
    with pytest.raises(ValueError, match="role"):
        create_key(store, "alice", "owner")


# --- authentication ----------------------------------------------------------------


def test_missing_key_is_401(client: TestClient) -> None:
    response = client.get("/v1/jobs")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header", ["Bearer", "Basic YWxpY2U6eA==", "Bearer not-a-key", "Token abc"]
)
def test_bad_authorization_is_401(client: TestClient, keys: dict, header: str) -> None:
    response = client.get("/v1/jobs", headers={"Authorization": header})
    assert response.status_code == 401


def test_revoked_key_is_401(client: TestClient, keys: dict, store: Store) -> None:
    assert client.get("/v1/jobs", headers=bearer(keys["bob"])).status_code == 200
    revoke_key(store, "bob")
    response = client.get("/v1/jobs", headers=bearer(keys["bob"]))
    assert response.status_code == 401
    assert "revoked" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "path", ["/v1/jobs", "/v1/models", "/v1/datasets", "/v1/limits", "/metrics"]
)
def test_endpoints_need_key(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 401


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_endpoints_are_open(client: TestClient, path: str) -> None:
    assert client.get(path).status_code in (200, 503)
    assert client.get(path).json().get("error", {}).get("code") != "unauthorized"


def test_logs_never_contain_keys(
    client: TestClient, keys: dict, alice_job: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    submit(client, keys["alice"])
    client.get(f"/v1/jobs/{alice_job}", headers=bearer(keys["bob"]))
    client.post(f"/v1/jobs/{alice_job}/cancel", headers=bearer(keys["root"]))
    client.get("/v1/jobs", headers=bearer(keys["alice"] + "x"))
    assert "submitted by alice" in caplog.text
    for key in keys.values():
        assert key not in caplog.text


# --- ownership ------------------------------------------------------------------------

CROSS_USER_REQUESTS = [
    ("GET", "/v1/jobs/{id}"),
    ("GET", "/v1/jobs/{id}/curves"),
    ("GET", "/v1/jobs/{id}/curves?format=csv"),
    ("GET", "/v1/jobs/{id}/analysis"),
    ("GET", "/v1/jobs/{id}/plots/loss-vs-lr.png"),
    ("GET", "/v1/jobs/{id}/plots/lr-schedule.svg"),
    ("GET", "/v1/jobs/{id}/events"),
    ("POST", "/v1/jobs/{id}/cancel"),
]


@pytest.mark.parametrize(("method", "path"), CROSS_USER_REQUESTS)
def test_other_users_job_is_404_like_unknown(
    client: TestClient, keys: dict, alice_job: str, method: str, path: str
) -> None:
    unknown_id = "0" * len(alice_job)
    other = client.request(
        method, path.format(id=alice_job), headers=bearer(keys["bob"])
    )
    unknown = client.request(
        method, path.format(id=unknown_id), headers=bearer(keys["bob"])
    )
    assert other.status_code == 404
    assert other.json()["error"]["code"] == unknown.json()["error"]["code"]
    assert other.json()["error"]["message"] == unknown.json()["error"][
        "message"
    ].replace(unknown_id, alice_job)


@pytest.mark.parametrize(("method", "path"), CROSS_USER_REQUESTS[:-1])
def test_owner_reads_own_job(
    client: TestClient, keys: dict, alice_job: str, method: str, path: str
) -> None:
    response = client.request(
        method, path.format(id=alice_job), headers=bearer(keys["alice"])
    )
    assert response.status_code == 200


def test_cross_user_cancel_leaves_job(
    client: TestClient, keys: dict, store: Store
) -> None:
    job_id = submit(client, keys["alice"]).json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(keys["bob"]))
    assert store.get_status(job_id) == "queued"


def test_listing_shows_only_own_jobs(client: TestClient, keys: dict) -> None:
    alice_id = submit(client, keys["alice"]).json()["id"]
    bob_id = submit(client, keys["bob"]).json()["id"]
    listing = client.get("/v1/jobs", headers=bearer(keys["bob"])).json()
    assert [job["id"] for job in listing["jobs"]] == [bob_id]
    assert alice_id not in json.dumps(listing)


def test_user_owner_filter_shows_only_own_jobs(client: TestClient, keys: dict) -> None:
    submit(client, keys["alice"])
    listing = client.get("/v1/jobs?owner=alice", headers=bearer(keys["bob"])).json()
    assert listing["total"] == 0


def test_admin_sees_all_jobs_with_owner(client: TestClient, keys: dict) -> None:
    alice_id = submit(client, keys["alice"]).json()["id"]
    bob_id = submit(client, keys["bob"]).json()["id"]
    listing = client.get("/v1/jobs", headers=bearer(keys["root"])).json()
    owners = {job["id"]: job["owner"] for job in listing["jobs"]}
    assert owners == {alice_id: "alice", bob_id: "bob"}


def test_admin_filters_by_owner(client: TestClient, keys: dict) -> None:
    alice_id = submit(client, keys["alice"]).json()["id"]
    submit(client, keys["bob"])
    listing = client.get("/v1/jobs?owner=alice", headers=bearer(keys["root"])).json()
    assert [job["id"] for job in listing["jobs"]] == [alice_id]


def test_admin_reads_and_cancels_any_job(client: TestClient, keys: dict) -> None:
    job_id = submit(client, keys["alice"]).json()["id"]
    read = client.get(f"/v1/jobs/{job_id}", headers=bearer(keys["root"]))
    cancel = client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(keys["root"]))
    assert read.json()["owner"] == "alice"
    assert cancel.status_code == 202
    assert cancel.json()["status"] == "cancelled"


# --- quotas and rate limits ---------------------------------------------------------


def test_fifth_active_job_is_429_and_not_queued(
    client: TestClient, keys: dict, store: Store
) -> None:
    for _ in range(4):
        assert submit(client, keys["alice"]).status_code == 202
    response = submit(client, keys["alice"])
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "quota_exceeded"
    assert "max_active_jobs" in response.json()["error"]["message"]
    assert queued_messages(store) == 4
    assert store.list_jobs(owner="alice")[1] == 4
    assert store.count_active("alice") == 4


def test_quota_is_per_user(client: TestClient, keys: dict) -> None:
    for _ in range(4):
        submit(client, keys["alice"])
    assert submit(client, keys["bob"]).status_code == 202


def test_cancel_frees_quota_slot(client: TestClient, keys: dict) -> None:
    ids = [submit(client, keys["alice"]).json()["id"] for _ in range(4)]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=bearer(keys["alice"]))
    assert submit(client, keys["alice"]).status_code == 202


def test_submissions_past_rate_are_429_with_retry_after(
    redis_service: RedisServer, tmp_path: Path, store: Store, keys: dict
) -> None:
    settings = make_settings(
        redis_service.url,
        make_image_folder(tmp_path / "data" / "pets").parent,
        submissions_per_minute=3,
        max_active_jobs=10,
    )
    with TestClient(create_app(settings)) as client:
        statuses = [submit(client, keys["alice"]).status_code for _ in range(3)]
        response = submit(client, keys["alice"])
    assert statuses == [202, 202, 202]
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert queued_messages(store) == 3


# --- open mode ------------------------------------------------------------------------


def test_open_mode_off_loopback_is_refused(settings: Settings) -> None:
    open_settings = settings.model_copy(update={"auth": "none", "api_host": "0.0.0.0"})
    with pytest.raises(ValueError, match="loopback"):
        create_app(open_settings)


def test_unknown_auth_mode_is_refused(settings: Settings) -> None:
    with pytest.raises(ValueError, match="LRFINDER_AUTH"):
        create_app(settings.model_copy(update={"auth": "off"}))


def test_open_mode_on_loopback_is_local_admin(settings: Settings, store: Store) -> None:
    open_settings = settings.model_copy(update={"auth": "none", "api_host": "::1"})
    with TestClient(create_app(open_settings)) as client:
        response = client.post("/v1/jobs", json=VALID_SPEC)
    assert response.status_code == 202
    assert response.json()["owner"] == "local"


def test_open_mode_rejects_remote_client(settings: Settings, store: Store) -> None:
    open_settings = settings.model_copy(update={"auth": "none"})
    app = create_app(open_settings)
    with TestClient(app, client=("192.0.2.7", 50000)) as client:
        response = client.get("/v1/jobs")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
