"""Fault injection against real processes: every job ends, nothing is lost.

Each test starts the servers it breaks: a private redis-server, Celery
workers, the API under uvicorn. It injects one fault (SIGKILL, SIGTERM, a
Redis restart, an API restart, out of memory, a cancellation, a spent time
budget). Then it checks that the job reaches a final status with a reason
and that the curves stored before the fault are still there. Short
heartbeat settings make lost workers noticed within seconds.
"""

# Fixtures imported from tests.stack share their names with test arguments.
# ruff: noqa: F811

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.queue import JobQueue
from lrfinder.delivery import visibility_timeout_s
from lrfinder.jobs import Job
from lrfinder.reaper import grace_s
from lrfinder.settings import Settings, get_settings
from lrfinder.spec import JobSpec, RuntimeSpec
from lrfinder.store import Store
from tests.stack import (  # noqa: F401
    ApiServer,
    RedisServer,
    Service,
    api_process,
    is_final,
    redis_server,
    redis_service,
    send_job,
    service_env,
    show_logs_on_failure,
    start_worker,
    store,
    wait_for_job,
    wait_until,
    worker_process,
    worker_service,
)
from worker.hooks import FLUSH_POINTS

HEARTBEAT = {
    "LRFINDER_HEARTBEAT_INTERVAL_S": "0.5",
    "LRFINDER_HEARTBEAT_TIMEOUT_S": "3",
}
# Seconds a lost job may take to end or be re-queued under HEARTBEAT: the
# heartbeat's lifetime, the reaper's grace period and a sweep, with room for
# a busy machine.
LOST_JOB_TIMEOUT_S = 3 + grace_s(Settings(heartbeat_interval_s=0.5)) + 30

# No divergence stop and small rates, so a sweep runs all of its steps.
SPEC = JobSpec(
    model={"name": "small_cnn"},
    dataset={"name": "photos", "image_size": 32},
    batch_sizes=[8, 4],
    sweep={"num_iter": 150, "end_lr": 1e-2, "diverge_threshold": None},
)


def sweep_spec(num_iter: int, **changes: object) -> JobSpec:
    sweep = SPEC.sweep.model_copy(update={"num_iter": num_iter})
    return SPEC.model_copy(update={"sweep": sweep, **changes})


def submit(store: Store, redis_url: str, spec: JobSpec, queue: str) -> str:
    job = store.create_job(spec)
    send_job(redis_url, job.id, queue)
    return job.id


def wait_for_points(
    store: Store, job_id: str, run_name: str, count: int, *services: Service
) -> None:
    wait_for_job(
        store,
        job_id,
        lambda job: store.count_points(job_id, run_name) >= count or is_final(job),
        services=services,
    )


def run_starts(store: Store, job_id: str, run_name: str) -> int:
    """Count the executions that started the run, from the job's events."""
    return sum(
        1
        for event in store.read_events(job_id, count=100_000)
        if event.type == "run"
        and event.data["run"] == run_name
        and event.data.get("reset")
    )


@pytest.fixture
def heartbeat_env(redis_service: RedisServer, data_root: Path) -> dict[str, str]:
    return service_env(redis_service.url, data_root, HEARTBEAT)


# Visibility timeout.


def test_visibility_timeout_exceeds_longest_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LRFINDER_MAX_TIME_LIMIT_S", "7200")
    get_settings.cache_clear()
    try:
        from worker.app import create_app

        worker_options = create_app().conf.broker_transport_options
        api_options = JobQueue(get_settings()).celery.conf.broker_transport_options
    finally:
        get_settings.cache_clear()
    assert worker_options["visibility_timeout"] > 7200
    assert api_options["visibility_timeout"] == worker_options["visibility_timeout"]
    assert worker_options["visibility_timeout"] == visibility_timeout_s(
        Settings(max_time_limit_s=7200)
    )


# Worker killed with no other worker alive.


@pytest.mark.slow
def test_sigkill_only_worker_fails_worker_lost(
    store: Store,
    redis_service: RedisServer,
    data_root: Path,
    tmp_path: Path,
    show_logs_on_failure: list[Service],
) -> None:
    env = service_env(
        redis_service.url, data_root, {**HEARTBEAT, "LRFINDER_MAX_ATTEMPTS": "1"}
    )
    with api_process(redis_service.url, env, log_dir=tmp_path) as api:
        show_logs_on_failure.append(api)
        worker = start_worker(
            redis_service.url, env, name="only", queue="only", log_dir=tmp_path
        )
        show_logs_on_failure.append(worker)
        try:
            job_id = submit(store, redis_service.url, sweep_spec(200), "only")
            wait_for_points(store, job_id, "4-0", 5, worker)
            first_curve = store.get_points(job_id, "8-0")
            worker.kill()
        finally:
            worker.stop()
        failed = wait_for_job(
            store, job_id, is_final, timeout_s=LOST_JOB_TIMEOUT_S, services=(api,)
        )
        api_log = api.log_text()
    assert (failed.status, failed.reason) == ("failed", "worker_lost")
    assert failed.partial is True
    assert failed.runs[0].status == "succeeded"
    assert store.get_points(job_id, "8-0") == first_curve
    assert (failed.runs[1].status, failed.runs[1].stop_reason) == (
        "failed",
        "worker_lost",
    )
    assert store.count_points(job_id, "4-0") >= 5
    assert f"job {job_id}: worker lost" in api_log


# The fan-out case comes before any test that starts a module's workers,
# whose reapers would re-queue the lost job on their own queues.


@pytest.mark.slow
def test_fan_out_sigkill_only_worker_fails_worker_lost(
    store: Store,
    redis_service: RedisServer,
    data_root: Path,
    tmp_path: Path,
    show_logs_on_failure: list[Service],
) -> None:
    env = service_env(
        redis_service.url, data_root, {**HEARTBEAT, "LRFINDER_MAX_ATTEMPTS": "1"}
    )
    spec = sweep_spec(600, runtime=RuntimeSpec(fan_out=True))
    with api_process(redis_service.url, env, log_dir=tmp_path) as api:
        show_logs_on_failure.append(api)
        worker = start_worker(
            redis_service.url, env, name="alone", queue="alone", log_dir=tmp_path
        )
        show_logs_on_failure.append(worker)
        try:
            job_id = submit(store, redis_service.url, spec, "alone")
            # The worker may take either run's message first.
            job = wait_for_job(
                store,
                job_id,
                lambda job: is_final(job) or second_run_started(store, job),
                services=(worker,),
            )
            under_way = second_run_started(store, job)
            assert under_way is not None, job.runs
            finished, killed = under_way
            finished_curve = store.get_points(job_id, finished)
            worker.kill()
        finally:
            worker.stop()
        failed = wait_for_job(
            store, job_id, is_final, timeout_s=LOST_JOB_TIMEOUT_S, services=(api,)
        )
        api_log = api.log_text()
    runs = {f"{run.batch_size}-0": run for run in failed.runs}
    assert (failed.status, failed.reason, failed.partial) == (
        "failed",
        "worker_lost",
        True,
    )
    assert runs[finished].status == "succeeded"
    assert store.get_points(job_id, finished) == finished_curve
    assert (runs[killed].status, runs[killed].stop_reason) == (
        "failed",
        "worker_lost",
    )
    assert store.count_points(job_id, killed) >= 5
    assert f"job {job_id}: worker lost" in api_log


def second_run_started(store: Store, job: Job) -> tuple[str, str] | None:
    """Return (succeeded run, run with 5 points) once the second run is under way."""
    names = [f"{run.batch_size}-0" for run in job.runs]
    succeeded = [
        name for name, run in zip(names, job.runs) if run.status == "succeeded"
    ]
    started = [
        name
        for name, run in zip(names, job.runs)
        if run.status == "running" and store.count_points(job.id, name) >= 5
    ]
    if len(succeeded) == 1 and len(started) == 1:
        return succeeded[0], started[0]
    return None


@pytest.mark.slow
def test_queued_job_without_message_runs(
    store: Store,
    redis_service: RedisServer,
    worker_service: Service,
    heartbeat_env: dict[str, str],
    tmp_path: Path,
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.append(worker_service)
    with api_process(redis_service.url, heartbeat_env, log_dir=tmp_path) as api:
        show_logs_on_failure.append(api)
        # Stored but never sent, as when a worker dies between taking the
        # message and starting the job.
        job = store.create_job(sweep_spec(20))
        done = wait_for_job(
            store,
            job.id,
            is_final,
            timeout_s=LOST_JOB_TIMEOUT_S + 60,
            services=(api, worker_service),
        )
        api_log = api.log_text()
    assert done.status == "succeeded", done.error
    assert done.attempts == 1
    assert f"job {job.id}: queued without a message; sent one" in api_log


# Time budget.


@pytest.mark.slow
def test_time_limit_keeps_curve(
    store: Store,
    redis_service: RedisServer,
    worker_service: Service,
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.append(worker_service)
    spec = sweep_spec(3000, time_limit_s=5.0)
    job_id = submit(store, redis_service.url, spec, "lrfinder")
    done = wait_for_job(store, job_id, is_final, services=(worker_service,))
    first, second = done.runs
    assert (done.status, done.reason) == ("succeeded", "time_limit")
    assert done.partial is True
    assert (first.status, first.stop_reason) == ("succeeded", "time_limit")
    assert 0 < store.count_points(job_id, "8-0") < spec.sweep.num_iter
    assert store.count_points(job_id, "8-0") == first.step
    assert (second.status, second.stop_reason) == ("failed", "time_limit")


# Out of memory at one batch size.


@pytest.fixture(scope="module")
def oom_worker(
    redis_service: RedisServer,
    data_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    """A worker on queue "oom" whose small CNN runs out of memory at 16 and 12."""
    launcher = (sys.executable, "-m", "tests.oom_worker", "16,12")
    with worker_process(
        redis_service.url,
        service_env(redis_service.url, data_root),
        name="oom",
        queue="oom",
        log_dir=tmp_path_factory.mktemp("oom"),
        launcher=launcher,
    ) as worker:
        yield worker


@pytest.mark.slow
def test_out_of_memory_one_batch_size_partial(
    store: Store,
    redis_service: RedisServer,
    oom_worker: Service,
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.append(oom_worker)
    spec = sweep_spec(20, batch_sizes=[16, 8, 4])
    job_id = submit(store, redis_service.url, spec, "oom")
    done = wait_for_job(store, job_id, is_final, services=(oom_worker,))
    failed, *finished = done.runs
    assert (done.status, done.partial) == ("succeeded", True)
    assert (failed.status, failed.stop_reason) == ("failed", "out_of_memory")
    assert "batch size 16" in failed.error
    assert "sweep.accumulation_steps" in failed.error
    assert "CUDA out of memory" in failed.error
    assert [run.status for run in finished] == ["succeeded", "succeeded"]
    assert store.count_points(job_id, "8-0") == 20
    assert store.count_points(job_id, "4-0") == 20


@pytest.mark.slow
def test_out_of_memory_every_batch_size_fails(
    store: Store,
    redis_service: RedisServer,
    oom_worker: Service,
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.append(oom_worker)
    spec = sweep_spec(20, batch_sizes=[16, 12])
    job_id = submit(store, redis_service.url, spec, "oom")
    done = wait_for_job(store, job_id, is_final, services=(oom_worker,))
    assert (done.status, done.reason) == ("failed", "out_of_memory")
    assert "batch size 16" in done.error
    assert "batch size 12" in done.error
    assert [run.stop_reason for run in done.runs] == ["out_of_memory"] * 2


# Cancellation while queued, running and re-queued.


@pytest.mark.slow
def test_cancel_queued_and_running_jobs(
    store: Store,
    redis_service: RedisServer,
    worker_service: Service,
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.append(worker_service)
    running_id = submit(store, redis_service.url, sweep_spec(3000), "lrfinder")
    queued_id = submit(store, redis_service.url, sweep_spec(3000), "lrfinder")
    wait_for_points(store, running_id, "8-0", 5, worker_service)

    assert store.request_cancel(queued_id) == "cancelled"
    assert store.request_cancel(running_id) == "running"
    points_at_cancel = store.get_job(running_id).runs[0].step
    running = wait_for_job(store, running_id, is_final, services=(worker_service,))
    wait_until(
        lambda: f"job {queued_id}: already cancelled" in worker_service.log_text(),
        timeout_s=60.0,
        message="the worker takes the cancelled job's message",
    )
    queued = store.get_job(queued_id)

    assert (queued.status, queued.reason) == ("cancelled", "cancelled")
    assert queued.attempts == 0
    assert [run.status for run in queued.runs] == ["cancelled", "cancelled"]
    assert (running.status, running.reason) == ("cancelled", "cancelled")
    # The flag is read before every step, and unwritten points wait for at
    # most one flush, so a stop within one step stores at most this many.
    points_kept = store.count_points(running_id, "8-0")
    assert points_at_cancel <= points_kept <= points_at_cancel + FLUSH_POINTS + 1
    assert running.runs[0].stop_reason == "cancelled"


@pytest.mark.slow
def test_cancel_requeued_job_keeps_curve(
    store: Store,
    redis_service: RedisServer,
    heartbeat_env: dict[str, str],
    tmp_path: Path,
    show_logs_on_failure: list[Service],
) -> None:
    worker = start_worker(
        redis_service.url,
        heartbeat_env,
        name="retried",
        queue="retried",
        log_dir=tmp_path,
    )
    show_logs_on_failure.append(worker)
    try:
        job_id = submit(store, redis_service.url, sweep_spec(3000), "retried")
        wait_for_points(store, job_id, "8-0", 5, worker)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout_s=60.0), "the worker did not exit after SIGTERM"
    finally:
        worker.stop()
    requeued = store.get_job(job_id)
    curve = store.get_points(job_id, "8-0")
    assert requeued.status == "queued"
    assert store.request_cancel(job_id) == "cancelled"
    cancelled = store.get_job(job_id)
    assert (cancelled.status, cancelled.reason) == ("cancelled", "cancelled")
    assert [run.status for run in cancelled.runs] == ["cancelled", "cancelled"]
    assert len(curve) >= 5
    assert store.get_points(job_id, "8-0") == curve


# Redis restarts with its append-only file.


def get_json(api: ApiServer, path: str) -> httpx.Response:
    return httpx.get(f"{api.base_url}{path}", timeout=30.0)


def recovered(api: ApiServer, path: str) -> bool:
    return get_json(api, path).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize(
    ("heartbeat_timeout_s", "outage_s", "same_execution"),
    [
        # The worker's retries outlast the outage: the same execution goes on.
        ("15", 3.0, True),
        # They do not: the job is re-queued, by the worker or by the reaper.
        ("2", 15.0, False),
    ],
    ids=["short-outage", "long-outage"],
)
def test_redis_restart_mid_job(
    heartbeat_timeout_s: str,
    outage_s: float,
    same_execution: bool,
    data_root: Path,
    tmp_path: Path,
    show_logs_on_failure: list[Service],
) -> None:
    with redis_server(tmp_path, appendonly=True) as aof:
        env = service_env(
            aof.url,
            data_root,
            {
                "LRFINDER_HEARTBEAT_INTERVAL_S": "0.5",
                "LRFINDER_HEARTBEAT_TIMEOUT_S": heartbeat_timeout_s,
            },
        )
        with (
            api_process(aof.url, env, log_dir=tmp_path) as api,
            worker_process(aof.url, env, name="steady", log_dir=tmp_path) as worker,
        ):
            show_logs_on_failure.extend([aof, api, worker])
            check_redis_restart(aof, api, worker, outage_s, same_execution)


def check_redis_restart(
    aof: RedisServer,
    api: ApiServer,
    worker: Service,
    outage_s: float,
    same_execution: bool,
) -> None:
    spec = sweep_spec(300).model_dump(mode="json")
    job_id = httpx.post(f"{api.base_url}/v1/jobs", json=spec).json()["id"]
    store = Store.from_url(aof.url)
    wait_for_points(store, job_id, "4-0", 5, worker)
    first_curve = store.get_points(job_id, "8-0")
    second_start = store.get_points(job_id, "4-0")

    aof.stop()
    during = get_json(api, f"/v1/jobs/{job_id}")
    time.sleep(outage_s)
    aof.restart()
    wait_until(
        lambda: recovered(api, f"/v1/jobs/{job_id}"),
        timeout_s=60.0,
        message="the API answers again",
    )
    done = wait_for_job(store, job_id, is_final, timeout_s=180.0, services=(worker,))
    after = httpx.post(f"{api.base_url}/v1/jobs", json=sweep_spec(10).model_dump())
    later = wait_for_job(store, after.json()["id"], is_final, services=(worker,))

    assert during.status_code == 503
    assert during.json()["error"]["code"] == "redis_unavailable"
    assert int(during.headers["Retry-After"]) > 0
    assert done.status == "succeeded" or done.reason, done
    assert store.get_points(job_id, "8-0") == first_curve
    assert run_starts(store, job_id, "8-0") == 1
    if same_execution:
        assert done.attempts == 1
        assert store.get_points(job_id, "4-0")[: len(second_start)] == second_start
    assert "redis command failed" in worker.log_text()
    assert later.status == "succeeded", later.error
    store.close()


# API restart.


def read_events(
    base_url: str, job_id: str, last_event_id: str | None, limit: int
) -> list[tuple[str, str]]:
    """Read up to ``limit`` events (id, type) of the job's stream, or up to "end"."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[tuple[str, str]] = []
    event_id = event_type = None
    url = f"{base_url}/v1/jobs/{job_id}/events"
    with httpx.stream("GET", url, headers=headers, timeout=60.0) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("event: "):
                event_type = line[7:]
            elif line == "" and event_id and event_type:
                events.append((event_id, event_type))
                if event_type == "end" or len(events) >= limit:
                    return events
                event_id = event_type = None
    return events


@pytest.mark.slow
def test_api_restart_resumes_event_stream(
    store: Store,
    redis_service: RedisServer,
    worker_service: Service,
    data_root: Path,
    tmp_path: Path,
    show_logs_on_failure: list[Service],
) -> None:
    show_logs_on_failure.append(worker_service)
    env = service_env(redis_service.url, data_root)
    with api_process(redis_service.url, env, log_dir=tmp_path) as first:
        spec = sweep_spec(300).model_dump(mode="json")
        job_id = httpx.post(f"{first.base_url}/v1/jobs", json=spec).json()["id"]
        before = read_events(first.base_url, job_id, None, limit=10)
        first.kill()
    with api_process(redis_service.url, env, log_dir=tmp_path) as second:
        after = read_events(second.base_url, job_id, before[-1][0], limit=100_000)
        job = get_json(second, f"/v1/jobs/{job_id}").json()
    stored = [
        (event.id, event.type) for event in store.read_events(job_id, count=100_000)
    ]

    assert len(before) == 10
    assert after[-1][1] == "end"
    assert before + after == stored
    assert job["status"] == "succeeded"
    assert [run["status"] for run in job["runs"]] == ["succeeded", "succeeded"]


# Fan-out jobs: each run is a task of its own, on several workers.

FAN_OUT_SPEC = sweep_spec(20000, runtime=RuntimeSpec(fan_out=True))


class WorkerPool:
    """Workers with short heartbeats on one queue; ``ensure`` replaces stopped ones."""

    def __init__(
        self, redis_url: str, env: dict[str, str], log_dir: Path, size: int = 2
    ) -> None:
        self.redis_url = redis_url
        self.env = env
        self.log_dir = log_dir
        self.size = size
        self.started: list[Service] = []

    @property
    def alive(self) -> list[Service]:
        return [worker for worker in self.started if worker.alive()]

    def ensure(self) -> list[Service]:
        """Start workers until ``size`` run, and wait until each takes tasks."""
        while len(self.alive) < self.size:
            worker = start_worker(
                self.redis_url,
                self.env,
                name=f"fan{len(self.started)}",
                queue="fanout",
                log_dir=self.log_dir,
            )
            self.started.append(worker)
        for worker in self.alive:
            # A worker loads the study before its first task, so one that
            # is still loading would leave every run to the other.
            wait_until(
                lambda worker=worker: "study module loaded" in worker.log_text(),
                timeout_s=120.0,
                message=f"{worker.name} takes tasks",
            )
        return self.alive

    def worker_of(self, store: Store, job_id: str, run_name: str) -> Service:
        """Return the worker whose process started the run last."""
        events = store.read_events(job_id, count=100_000)
        started = [
            event.data["worker"]
            for event in events
            if event.type == "status" and event.data.get("run") == run_name
        ]
        pid = int(started[-1].rsplit(":", 1)[1])
        return next(w for w in self.started if w.process and w.process.pid == pid)


@pytest.fixture(scope="module")
def fan_out_pool(
    redis_service: RedisServer,
    data_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerPool]:
    env = service_env(redis_service.url, data_root, HEARTBEAT)
    pool = WorkerPool(redis_service.url, env, tmp_path_factory.mktemp("fan-out"))
    try:
        yield pool
    finally:
        for worker in pool.started:
            worker.stop()


def wait_for_two_runs(store: Store, job_id: str, *services: Service) -> None:
    wait_for_job(
        store,
        job_id,
        lambda job: (
            min(store.count_points(job_id, name) for name in ("8-0", "4-0")) >= 5
            or is_final(job)
        ),
        services=services,
    )


@pytest.mark.slow
def test_fan_out_sigkill_requeues_run_while_other_runs(
    store: Store,
    redis_service: RedisServer,
    fan_out_pool: WorkerPool,
    show_logs_on_failure: list[Service],
) -> None:
    workers = fan_out_pool.ensure()
    show_logs_on_failure.extend(workers)
    # The budget ends both sweeps; it leaves the killed run time to run again.
    spec = FAN_OUT_SPEC.model_copy(update={"time_limit_s": 25.0})
    job_id = submit(store, redis_service.url, spec, "fanout")
    wait_for_two_runs(store, job_id, *workers)
    doomed = fan_out_pool.worker_of(store, job_id, "4-0")
    survivor = fan_out_pool.worker_of(store, job_id, "8-0")
    assert doomed is not survivor
    doomed.kill()

    replacement = next(w for w in fan_out_pool.ensure() if w is not survivor)
    show_logs_on_failure.append(replacement)
    restarted = wait_for_job(
        store,
        job_id,
        lambda job: job.runs[1].attempt >= 2 or is_final(job),
        timeout_s=LOST_JOB_TIMEOUT_S,
        services=(survivor, replacement),
    )
    # The lost run started again while the job's other run still ran.
    assert restarted.status == "running"
    assert restarted.runs[0].status == "running"

    done = wait_for_job(
        store, job_id, is_final, services=(survivor, replacement), timeout_s=120.0
    )
    first, second = done.runs
    assert (done.status, done.reason, done.attempts) == (
        "succeeded",
        "time_limit",
        2,
    )
    assert (first.status, first.attempt) == ("succeeded", 1)
    assert run_starts(store, job_id, "8-0") == 1
    assert (second.status, second.attempt) == ("succeeded", 2)
    assert store.count_points(job_id, "4-0") == second.step > 0
    assert fan_out_pool.worker_of(store, job_id, "4-0") is replacement
    lost = [
        event.data
        for event in store.read_events(job_id, count=100_000)
        if event.type == "run" and event.data.get("stop_reason") == "worker_lost"
    ]
    assert [(event["run"], event["status"]) for event in lost] == [("4-0", "pending")]
    assert f"job {job_id}: worker of run 4-0 lost; run re-queued" in (
        survivor.log_text() + replacement.log_text()
    )


@pytest.mark.slow
def test_fan_out_sigterm_every_worker_requeues_job(
    store: Store,
    redis_service: RedisServer,
    fan_out_pool: WorkerPool,
    show_logs_on_failure: list[Service],
) -> None:
    workers = fan_out_pool.ensure()
    show_logs_on_failure.extend(workers)
    spec = sweep_spec(1500, runtime=RuntimeSpec(fan_out=True))
    job_id = submit(store, redis_service.url, spec, "fanout")
    wait_for_two_runs(store, job_id, *workers)
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        assert worker.wait(timeout_s=60.0), f"{worker.name} ignored SIGTERM"
    queued = store.get_job(job_id)
    curves = {name: store.count_points(job_id, name) for name in ("8-0", "4-0")}
    assert (queued.status, queued.attempts) == ("queued", 0)
    assert [(run.status, run.stop_reason) for run in queued.runs] == [
        ("pending", "interrupted")
    ] * 2
    assert min(curves.values()) >= 5
    workers = fan_out_pool.ensure()
    show_logs_on_failure.extend(workers)
    done = wait_for_job(store, job_id, is_final, services=tuple(workers))
    assert (done.status, done.attempts) == ("succeeded", 1), done.error
    assert [run.attempt for run in done.runs] == [2, 2]
    for run in done.runs:
        assert store.count_points(job_id, f"{run.batch_size}-0") == run.step
