"""Property-based fuzzing of the live API over its own OpenAPI schema.

Schemathesis generates valid and invalid requests for every operation and
sends them, with an admin key, to the API under uvicorn on a private
redis-server. No response may be a 5xx. A worker presence key written by the
test makes /readyz return 200, and submitted jobs stay queued.
Hypothesis runs derandomized, so every run sends the same requests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from api.main import create_app
from lrfinder.keys import create_key
from lrfinder.settings import Settings
from lrfinder.store import Store
from tests.stack import ApiServer, RedisServer, api_process, redis_service, service_env  # noqa: F401
from tests.test_api import make_image_folder

EXAMPLES_PER_OPERATION = 12
# Long enough for the whole run; a real worker refreshes its key every few seconds.
PRESENCE_TTL_S = 600


@pytest.fixture(scope="module")
def fuzz_store(redis_service: RedisServer) -> Iterator[Store]:
    store = Store.from_url(redis_service.url)
    store.register_worker("fuzz@localhost", {"host": "localhost", "device": "cpu"})
    store.client.expire(store.key("worker", "fuzz@localhost"), PRESENCE_TTL_S)
    yield store
    store.close()


@pytest.fixture(scope="module")
def fuzz_api(
    redis_service: RedisServer,
    fuzz_store: Store,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ApiServer]:
    """The API with keys on, and limits high enough that valid jobs are queued."""
    data_root = make_image_folder(tmp_path_factory.mktemp("fuzz-data") / "pets").parent
    env = service_env(
        redis_service.url,
        data_root,
        {
            "LRFINDER_AUTH": "keys",
            "LRFINDER_WEIGHTS_ROOT": str(data_root.parent / "weights"),
            "LRFINDER_SUBMISSIONS_PER_MINUTE": "100000",
            "LRFINDER_MAX_ACTIVE_JOBS": "100000",
        },
    )
    log_dir = tmp_path_factory.mktemp("fuzz-api")
    with api_process(redis_service.url, env, log_dir=log_dir) as server:
        yield server


@pytest.fixture(scope="module")
def admin_headers(fuzz_store: Store) -> dict[str, str]:
    key, _ = create_key(fuzz_store, "fuzzer", "admin")
    return {"Authorization": f"Bearer {key}"}


def load_schema() -> schemathesis.BaseSchema:
    """Load the OpenAPI schema of the app, the same one the live server serves."""
    app = create_app(Settings(auth="keys", api_host="127.0.0.1"))
    return schemathesis.openapi.from_dict(app.openapi())


# NOTE: schemathesis.pytest.from_fixture would load the schema from the live
# server, but schemathesis 4.32.5 fails under pytest 9 (it sets
# Function._nodeid, which pytest 9 no longer has), so the schema comes from
# the app object.
schema = load_schema()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_never_returns_5xx(
    case: schemathesis.Case, fuzz_api: ApiServer, admin_headers: dict[str, str]
) -> None:
    response = case.call(base_url=fuzz_api.base_url, headers=admin_headers, timeout=30)
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: "
        f"{response.text[:500]}"
    )
