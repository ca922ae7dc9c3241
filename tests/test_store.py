"""The Redis store against a private redis-server."""

# Fixtures imported from tests.stack share their names with test arguments.
# ruff: noqa: F811

from __future__ import annotations

import time

import pytest

from lrfinder.jobs import DataReport, Point
from lrfinder.spec import JobSpec
from lrfinder.store import EVENTS_MAXLEN, WORKER_TTL_S, Store, StoreError
from tests.stack import RedisServer, redis_service, store  # noqa: F401

SPEC = JobSpec(
    dataset={"name": "photos", "image_size": 32},
    batch_sizes=[16, 8],
    sweep={"num_iter": 30},
)


def make_point(step: int) -> Point:
    return Point(
        step=step,
        lr=1e-5 * 1.5**step,
        loss=0.7 - 0.01 * step,
        smoothed_loss=0.7,
        samples=16 * (step + 1),
        elapsed_s=0.1 * step,
    )


def start(store: Store, job_id: str, max_attempts: int = 2) -> str:
    return store.mark_running(
        job_id, worker="host:1", device="cpu", max_attempts=max_attempts
    )


def test_create_job_round_trip(store: Store) -> None:
    created = store.create_job(SPEC, owner="alice")
    loaded = store.get_job(created.id)
    assert loaded == created
    assert loaded.spec == SPEC
    assert loaded.status == "queued"
    assert loaded.owner == "alice"


def test_create_job_one_pending_run_per_batch_size(store: Store) -> None:
    job = store.create_job(SPEC)
    assert [(run.batch_size, run.status) for run in job.runs] == [
        (16, "pending"),
        (8, "pending"),
    ]
    assert all(run.num_iter == 30 for run in job.runs)


def test_get_job_unknown_returns_none(store: Store) -> None:
    assert store.get_job("0" * 32) is None


def test_every_key_has_ttl(store: Store) -> None:
    job = store.create_job(SPEC, owner="alice")
    store.acquire_lock(job.id, "token")
    store.beat(job.id, "host:1")
    start(store, job.id)
    store.record_progress(job.id, "16-0", [make_point(0)], job.runs[0])
    store.set_data_report(job.id, DataReport(images=96, classes=["cats", "dogs"]))
    store.request_cancel(job.id)
    store.register_worker("worker@host", {"host": "host"})
    store.count_submission("alice")
    keys = store.client.keys("lrfinder:*")
    assert len(keys) >= 12
    for key in keys:
        assert store.client.ttl(key) > 0, key


def test_job_keys_expire_after_result_ttl(redis_service: RedisServer) -> None:
    short = Store(Store.from_url(redis_service.url).client, ttl_s=100)
    job = short.create_job(SPEC)
    for key in short.client.keys(f"lrfinder:job:{job.id}*"):
        assert 90 <= short.client.ttl(key) <= 100, key


def test_heartbeat_and_lock_expire_after_timeout(redis_service: RedisServer) -> None:
    quick = Store(Store.from_url(redis_service.url).client, heartbeat_timeout_s=7)
    job = quick.create_job(SPEC)
    quick.beat(job.id, "host:1")
    quick.acquire_lock(job.id, "token")
    assert 0 < quick.client.pttl(quick.job_key(job.id, "heartbeat")) <= 7000
    assert 0 < quick.client.pttl(quick.job_key(job.id, "lock")) <= 7000


def test_list_jobs_newest_first(store: Store) -> None:
    ids = [
        store.create_job(SPEC, owner="alice", now=time.time() + i).id for i in range(3)
    ]
    jobs, total = store.list_jobs(owner="alice")
    assert [job.id for job in jobs] == ids[::-1]
    assert total == 3


def test_list_jobs_pages(store: Store) -> None:
    ids = [
        store.create_job(SPEC, owner="alice", now=time.time() + i).id for i in range(5)
    ]
    jobs, total = store.list_jobs(owner="alice", limit=2, offset=1)
    assert [job.id for job in jobs] == [ids[3], ids[2]]
    assert total == 5


def test_list_jobs_filters_by_status(store: Store) -> None:
    queued = store.create_job(SPEC, owner="alice")
    cancelled = store.create_job(SPEC, owner="alice")
    store.request_cancel(cancelled.id)
    jobs, total = store.list_jobs(owner="alice", status="cancelled")
    assert [job.id for job in jobs] == [cancelled.id]
    assert total == 1
    assert queued.id not in [job.id for job in jobs]


def test_list_jobs_separates_owners(store: Store) -> None:
    store.create_job(SPEC, owner="alice")
    bob_job = store.create_job(SPEC, owner="bob")
    jobs, _ = store.list_jobs(owner="bob")
    assert [job.id for job in jobs] == [bob_job.id]
    _, total = store.list_jobs(all_owners=True)
    assert total == 2


def test_list_jobs_skips_expired_jobs(store: Store) -> None:
    job = store.create_job(SPEC, owner="alice")
    store.client.delete(store.job_key(job.id))
    jobs, _ = store.list_jobs(owner="alice")
    assert jobs == []


def test_record_progress_appends_points_in_order(store: Store) -> None:
    job = store.create_job(SPEC)
    state = job.runs[0]
    store.record_progress(job.id, "16-0", [make_point(0), make_point(1)], state)
    store.record_progress(job.id, "16-0", [make_point(2)], state)
    points = store.get_points(job.id, "16-0")
    assert [point.step for point in points] == [0, 1, 2]
    assert points[2] == make_point(2)


def test_record_progress_stores_run_state(store: Store) -> None:
    job = store.create_job(SPEC)
    state = job.runs[1].model_copy(update={"status": "running", "step": 2})
    store.record_progress(job.id, "8-0", [make_point(0), make_point(1)], state)
    assert store.get_runs(job.id)["8-0"] == state


def test_record_progress_emits_points_then_progress(store: Store) -> None:
    job = store.create_job(SPEC)
    state = job.runs[0].model_copy(update={"step": 1})
    store.record_progress(job.id, "16-0", [make_point(0)], state)
    events = store.read_events(job.id)
    assert [event.type for event in events] == ["status", "points", "progress"]
    assert events[1].data["points"][0]["lr"] == make_point(0).lr
    assert events[2].data == {
        "run": "16-0",
        "step": 1,
        "num_iter": 30,
        "loss": make_point(0).loss,
        "lr": make_point(0).lr,
    }


def test_read_events_resumes_after_id(store: Store) -> None:
    job = store.create_job(SPEC)
    first = store.read_events(job.id)[-1].id
    store.add_event(job.id, "progress", {"run": "16-0", "step": 5})
    events = store.read_events(job.id, after=first)
    assert [event.data for event in events] == [{"run": "16-0", "step": 5}]


def test_read_events_blocks_until_timeout(store: Store) -> None:
    job = store.create_job(SPEC)
    last = store.read_events(job.id)[-1].id
    assert store.read_events(job.id, after=last, block_ms=50) == []


def test_add_event_rejects_unknown_type(store: Store) -> None:
    job = store.create_job(SPEC)
    with pytest.raises(ValueError, match="'noise'"):
        store.add_event(job.id, "noise", {})


def test_event_stream_is_capped(store: Store) -> None:
    job = store.create_job(SPEC)
    pipe = store.client.pipeline()
    for step in range(EVENTS_MAXLEN + 500):
        store._add_event(pipe, job.id, "progress", {"step": step})
    pipe.execute()
    # Approximate trimming removes whole stream nodes, so the length may
    # exceed the cap by up to one node (100 entries by default).
    assert store.client.xlen(store.job_key(job.id, "events")) <= EVENTS_MAXLEN + 100


def test_reset_run_drops_points(store: Store) -> None:
    job = store.create_job(SPEC)
    store.record_progress(job.id, "16-0", [make_point(0)], job.runs[0])
    store.reset_run(job.id, "16-0", job.runs[0])
    assert store.get_points(job.id, "16-0") == []
    assert store.read_events(job.id)[-1].data["reset"] is True


def test_get_all_points_by_run(store: Store) -> None:
    job = store.create_job(SPEC)
    store.record_progress(job.id, "8-0", [make_point(0)], job.runs[1])
    points = store.get_all_points(job.id, ["16-0", "8-0"])
    assert points == {"16-0": [], "8-0": [make_point(0)]}


def test_mark_running_records_worker(store: Store) -> None:
    job = store.create_job(SPEC)
    assert start(store, job.id) == "running"
    running = store.get_job(job.id)
    assert running.status == "running"
    assert running.worker == "host:1"
    assert running.device == "cpu"
    assert running.attempts == 1
    assert running.started_at is not None
    assert store.running_job_ids() == [job.id]


def test_mark_running_fails_when_attempts_spent(store: Store) -> None:
    job = store.create_job(SPEC)
    start(store, job.id, max_attempts=1)
    assert start(store, job.id, max_attempts=1) == "failed"
    failed = store.get_job(job.id)
    assert failed.reason == "worker_lost"
    assert "LRFINDER_MAX_ATTEMPTS" in failed.error


def test_mark_running_leaves_finished_job(store: Store) -> None:
    job = store.create_job(SPEC)
    store.request_cancel(job.id)
    assert start(store, job.id) == "cancelled"


def test_mark_running_unknown_job_raises(store: Store) -> None:
    with pytest.raises(StoreError, match="not found"):
        start(store, "missing")


def test_finish_job_sets_final_fields(store: Store) -> None:
    job = store.create_job(SPEC, owner="alice")
    start(store, job.id)
    assert store.finish_job(job.id, "failed", reason="dataset_invalid", error="empty")
    failed = store.get_job(job.id)
    assert (failed.status, failed.reason, failed.error) == (
        "failed",
        "dataset_invalid",
        "empty",
    )
    assert failed.finished_at is not None
    assert store.count_active("alice") == 0
    assert store.running_job_ids() == []


def test_finish_job_twice_keeps_first(store: Store) -> None:
    job = store.create_job(SPEC)
    start(store, job.id)
    store.finish_job(job.id, "succeeded", partial=True)
    assert not store.finish_job(job.id, "failed", reason="error")
    assert store.get_job(job.id).status == "succeeded"
    assert store.get_job(job.id).partial is True


def test_finish_job_rejects_open_status(store: Store) -> None:
    job = store.create_job(SPEC)
    with pytest.raises(ValueError, match="'running'"):
        store.finish_job(job.id, "running")


def test_finish_job_ends_event_stream(store: Store) -> None:
    job = store.create_job(SPEC)
    start(store, job.id)
    store.finish_job(job.id, "succeeded")
    last = store.read_events(job.id)[-1]
    assert last.type == "end"
    assert last.data["status"] == "succeeded"


def test_requeue_job_gives_attempt_back(store: Store) -> None:
    job = store.create_job(SPEC)
    start(store, job.id)
    assert store.requeue_job(job.id, reason="interrupted", count_attempt=False)
    requeued = store.get_job(job.id)
    assert requeued.status == "queued"
    assert requeued.attempts == 0
    assert requeued.worker is None


def test_requeue_job_counts_lost_attempt(store: Store) -> None:
    job = store.create_job(SPEC)
    start(store, job.id)
    store.requeue_job(job.id, reason="worker_lost", count_attempt=True)
    assert store.get_job(job.id).attempts == 1


def test_requeue_job_only_running(store: Store) -> None:
    job = store.create_job(SPEC)
    assert not store.requeue_job(job.id, reason="interrupted", count_attempt=False)


def test_request_cancel_queued_job_ends_it(store: Store) -> None:
    job = store.create_job(SPEC, owner="alice")
    assert store.request_cancel(job.id) == "cancelled"
    cancelled = store.get_job(job.id)
    assert cancelled.status == "cancelled"
    assert [run.status for run in cancelled.runs] == ["cancelled", "cancelled"]
    assert store.count_active("alice") == 0


def test_request_cancel_running_job_sets_flag(store: Store) -> None:
    job = store.create_job(SPEC)
    start(store, job.id)
    assert not store.is_cancel_requested(job.id)
    assert store.request_cancel(job.id) == "running"
    assert store.is_cancel_requested(job.id)
    assert store.get_status(job.id) == "running"


def test_request_cancel_finished_job_unchanged(store: Store) -> None:
    job = store.create_job(SPEC)
    start(store, job.id)
    store.finish_job(job.id, "succeeded")
    assert store.request_cancel(job.id) == "succeeded"
    assert not store.is_cancel_requested(job.id)


def test_request_cancel_unknown_job_raises(store: Store) -> None:
    with pytest.raises(StoreError):
        store.request_cancel("missing")


def test_close_unfinished_runs_leaves_finished(store: Store) -> None:
    job = store.create_job(SPEC)
    done = job.runs[0].model_copy(update={"status": "succeeded"})
    store.put_run(job.id, "16-0", done)
    assert store.close_unfinished_runs(job.id, "failed", "time_limit") == ["8-0"]
    runs = store.get_runs(job.id)
    assert runs["16-0"].status == "succeeded"
    assert (runs["8-0"].status, runs["8-0"].stop_reason) == ("failed", "time_limit")


def test_lock_has_one_holder(store: Store) -> None:
    assert store.acquire_lock("job", "first")
    assert not store.acquire_lock("job", "second")
    assert store.lock_holder("job") == "first"


def test_lock_release_needs_holder_token(store: Store) -> None:
    store.acquire_lock("job", "first")
    assert not store.release_lock("job", "second")
    assert store.release_lock("job", "first")
    assert store.acquire_lock("job", "second")


def test_lock_refresh_needs_holder_token(store: Store) -> None:
    store.acquire_lock("job", "first")
    assert store.refresh_lock("job", "first")
    assert not store.refresh_lock("job", "second")


def test_heartbeat_names_worker(store: Store) -> None:
    store.beat("job", "host:7")
    assert store.get_heartbeat("job")["worker"] == "host:7"


def test_active_jobs_track_queued_and_running(store: Store) -> None:
    first = store.create_job(SPEC, owner="alice")
    second = store.create_job(SPEC, owner="alice")
    start(store, first.id)
    assert store.active_job_ids("alice") == {first.id, second.id}
    store.finish_job(first.id, "succeeded")
    assert store.active_job_ids("alice") == {second.id}


def test_active_jobs_without_owner(store: Store) -> None:
    job = store.create_job(SPEC)
    assert store.active_job_ids(None) == {job.id}


def test_count_submission_per_minute(store: Store) -> None:
    now = 1_000_000.0
    assert store.count_submission("alice", now=now) == 1
    assert store.count_submission("alice", now=now + 1) == 2
    assert store.count_submission("alice", now=now + 60) == 1


def test_count_by_status(store: Store) -> None:
    store.create_job(SPEC)
    cancelled = store.create_job(SPEC)
    store.request_cancel(cancelled.id)
    assert store.count_by_status() == {"queued": 1, "cancelled": 1}


def test_worker_presence_expires(store: Store) -> None:
    store.register_worker("gpu0@host", {"device": "cuda:0"})
    assert [record["name"] for record in store.live_workers()] == ["gpu0@host"]
    assert 0 < store.client.ttl(store.key("worker", "gpu0@host")) <= WORKER_TTL_S
    store.unregister_worker("gpu0@host")
    assert store.live_workers() == []


def test_data_report_round_trip(store: Store) -> None:
    job = store.create_job(SPEC)
    report = DataReport(images=96, classes=["cats", "dogs"], skipped_files=1)
    store.set_data_report(job.id, report)
    assert store.get_job(job.id).data == report
