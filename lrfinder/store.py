"""Redis storage of jobs, runs, curves, events, quotas, API keys and workers.

The API process and the worker each create one ``Store`` (``Store.from_settings``
or ``Store.from_url``); both read and write the same keys, all of them defined
here. Every key starts with ``lrfinder:`` and expires: job keys after
``settings.result_ttl_days`` (the lifetime is renewed on every write), the
others as listed.

Key layout (``{id}`` is a job id, ``{run}`` a run name such as ``64-0``)::

    job:{id}                hash: spec (JSON), status, owner, created_at,
                            started_at, finished_at, worker, device, reason,
                            error, attempts, partial ("1"/"0"), data (JSON),
                            gradient_noise (JSON, the study's measurement);
                            a field that is None is absent
    job:{id}:runs           hash: run name -> RunState JSON
    job:{id}:points:{run}   list of Point JSON, appended in batches
    job:{id}:events         stream, MAXLEN ~ 20000, fields type and data (JSON);
                            types: status, progress, points, run, end
    job:{id}:cancel         string "1" once a cancellation was requested
    job:{id}:heartbeat      string JSON {worker, time}, expires after
                            settings.heartbeat_timeout_s unless refreshed
    job:{id}:lock           string: token of the execution that holds the job,
                            set with NX and PX settings.heartbeat_timeout_s
    job:{id}:lock:{run}     the same for one run of a fan-out job, whose runs
                            are separate tasks; their executions all refresh
                            job:{id}:heartbeat, so the job is lost only when
                            every one of them went silent
    jobs                    sorted set: job id scored by created_at
    jobs:owner:{owner}      sorted set: the same, per owner
    jobs:running            sorted set: running job ids scored by the start
                            of their current execution, scanned for jobs
                            whose worker went silent
    jobs:queued             sorted set: queued job ids scored by the time
                            they were queued, scanned for jobs whose
                            message was lost
    active:{owner}          set of the owner's queued and running job ids
    apikeys                 hash: sha256(key) hex -> key record JSON; written
                            and read by ``lrfinder.keys`` through
                            ``Store.redis``, and the only key without a TTL
    rate:{owner}:{minute}   counter of submissions in one minute, 120 s
    worker:{name}           string JSON {name, host, pid, device, queue,
                            started, time, hub_files, allow_downloads};
                            expires WORKER_TTL_S after the worker's last
                            refresh

A job's ``attempts`` counts the executions that started and may count towards
``settings.max_attempts``; a graceful re-queue (SIGTERM) gives its attempt back.
``started_at`` is the start of the first execution, so a job's wall-clock
budget spans every execution.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from lrfinder.jobs import (
    FINAL_JOB_STATUSES,
    DataReport,
    Job,
    Point,
    RunState,
)
from lrfinder.settings import Settings, get_settings
from lrfinder.spec import JobSpec

logger = logging.getLogger(__name__)

PREFIX = "lrfinder:"
EVENTS_MAXLEN = 20_000
WORKER_TTL_S = 30
RATE_WINDOW_TTL_S = 120
NO_OWNER = "-"

EVENT_TYPES = ("status", "progress", "points", "run", "end")
# Pauses between retries of a failed command double from the base up to the
# cap, and each is between half and all of that value (equal jitter).
RETRY_BACKOFF_BASE_S = 0.05
RETRY_BACKOFF_CAP_S = 2.0
# Each client logs a retried command at most once in this many seconds, with
# the number of failures it did not log.
RETRY_LOG_INTERVAL_S = 10.0
# A job id as ``new_job_id`` makes it; task ids contain dashes, so never match.
_JOB_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
# Job fields whose values are floats or ints when read back.
_FLOAT_FIELDS = ("created_at", "started_at", "finished_at")

# Give back the lock only while this execution still holds it.
_RELEASE_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""
_REFRESH_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""


class StoreError(Exception):
    """A job is missing or not in a state that allows the requested change."""


@dataclass(frozen=True)
class Event:
    """One entry of a job's event stream; ``id`` is the SSE event id."""

    id: str
    type: str
    data: dict[str, Any]


def new_job_id() -> str:
    """Return a fresh, unguessable job id (32 hex digits)."""
    return uuid.uuid4().hex


class _RetryLog:
    """Logs failed Redis commands that are retried, at most once per interval."""

    def __init__(self, interval_s: float = RETRY_LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.last_logged = -interval_s
        self.suppressed = 0

    def __call__(self, error: Exception) -> bool:
        now = time.monotonic()
        if now - self.last_logged < self.interval_s:
            self.suppressed += 1
            return True
        unlogged = (
            f" ({self.suppressed} failures not logged)" if self.suppressed else ""
        )
        logger.warning(
            "redis command failed (%s: %s); retrying with backoff%s",
            type(error).__name__,
            error,
            unlogged,
        )
        self.last_logged = now
        self.suppressed = 0
        return True


def retries_for(duration_s: float) -> int:
    """Return how many retries of one command wait at least ``duration_s`` in all.

    Counts the shortest pauses the backoff can draw, so a client made with
    ``connect(url, retries=retries_for(60))`` keeps retrying a command for
    between 60 and about 120 seconds.
    """
    retries = 0
    waited = 0.0
    while waited < duration_s:
        retries += 1
        waited += min(RETRY_BACKOFF_CAP_S, RETRY_BACKOFF_BASE_S * 2**retries) / 2
    return retries


def connect(url: str, *, retries: int = 3) -> redis.Redis:
    """Open a Redis client that retries failed connections with backoff.

    Args:
        url: Redis URL, for example ``redis://127.0.0.1:6379/0``.
        retries: Retries of one command after a connection error or timeout;
            see ``retries_for`` to turn a duration into a count.
    """
    retry = Retry(
        EqualJitterBackoff(cap=RETRY_BACKOFF_CAP_S, base=RETRY_BACKOFF_BASE_S),
        retries,
        is_retryable=_RetryLog(),
    )
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        retry=retry,
        socket_connect_timeout=5.0,
        socket_timeout=10.0,
        health_check_interval=30,
    )


def _now() -> float:
    return time.time()


def _owner_part(owner: str | None) -> str:
    return owner or NO_OWNER


class Store:
    """Reads and writes jobs and their curves in Redis.

    Args:
        client: A ``redis.Redis`` created with ``decode_responses=True``.
        ttl_s: Lifetime of job keys after their last write, seconds.
        heartbeat_timeout_s: Lifetime of a job heartbeat and lock, seconds.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_s: float = 30 * 86400,
        heartbeat_timeout_s: float = 60.0,
    ) -> None:
        self.client = client
        self.ttl_s = int(ttl_s)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._release_lock = client.register_script(_RELEASE_LOCK)
        self._refresh_lock = client.register_script(_REFRESH_LOCK)

    @classmethod
    def from_settings(
        cls, settings: Settings | None = None, *, retries: int = 3
    ) -> Store:
        """Create a store for ``settings.redis_url`` with its TTLs."""
        settings = settings or get_settings()
        return cls(
            connect(settings.redis_url, retries=retries),
            ttl_s=settings.result_ttl_days * 86400,
            heartbeat_timeout_s=settings.heartbeat_timeout_s,
        )

    @classmethod
    def from_url(
        cls, url: str, settings: Settings | None = None, *, retries: int = 3
    ) -> Store:
        """Create a store for ``url``, with the TTLs of ``settings``."""
        settings = (settings or get_settings()).model_copy(update={"redis_url": url})
        return cls.from_settings(settings, retries=retries)

    @property
    def redis(self) -> redis.Redis:
        """The underlying client, for modules that keep their own keys."""
        return self.client

    def ping(self) -> bool:
        """Return True when Redis replies to PING; raise redis.ConnectionError when it is down."""
        return bool(self.client.ping())

    def close(self) -> None:
        self.client.close()

    # Key names.

    @staticmethod
    def key(*parts: str) -> str:
        """Return the full key name for ``parts``, e.g. key("job", id)."""
        return PREFIX + ":".join(parts)

    def job_key(self, job_id: str, *suffix: str) -> str:
        return self.key("job", job_id, *suffix)

    def points_key(self, job_id: str, run_name: str) -> str:
        return self.job_key(job_id, "points", run_name)

    def _expire_job_keys(self, pipe: Any, job_id: str, *suffixes: str) -> None:
        pipe.expire(self.job_key(job_id), self.ttl_s)
        for suffix in suffixes:
            pipe.expire(self.job_key(job_id, suffix), self.ttl_s)

    # Job creation and reads.

    def create_job(
        self,
        spec: JobSpec,
        *,
        owner: str | None = None,
        job_id: str | None = None,
        now: float | None = None,
    ) -> Job:
        """Store a new queued job with one pending run per (batch size, repeat)."""
        job_id = job_id or new_job_id()
        created_at = now if now is not None else _now()
        fields = {
            "spec": spec.model_dump_json(),
            "status": "queued",
            "owner": owner or "",
            "created_at": repr(created_at),
            "attempts": "0",
            "partial": "0",
        }
        runs = {
            key.name: RunState(
                batch_size=key.batch_size,
                repeat=key.repeat,
                num_iter=spec.sweep.num_iter,
            ).model_dump_json()
            for key in spec.run_keys()
        }
        pipe = self.client.pipeline()
        pipe.hset(self.job_key(job_id), mapping=fields)
        pipe.hset(self.job_key(job_id, "runs"), mapping=runs)
        self._index_job(pipe, job_id, owner, created_at)
        self._add_event(pipe, job_id, "status", {"status": "queued"})
        self._expire_job_keys(pipe, job_id, "runs", "events")
        pipe.execute()
        return self.get_job(job_id)  # type: ignore[return-value]

    def _index_job(
        self, pipe: Any, job_id: str, owner: str | None, created_at: float
    ) -> None:
        owner_part = _owner_part(owner)
        for index_key in (self.key("jobs"), self.key("jobs", "owner", owner_part)):
            pipe.zadd(index_key, {job_id: created_at})
            pipe.expire(index_key, self.ttl_s)
        pipe.sadd(self.key("active", owner_part), job_id)
        pipe.expire(self.key("active", owner_part), self.ttl_s)
        self._index_queued(pipe, job_id, created_at)

    def _index_queued(self, pipe: Any, job_id: str, queued_at: float) -> None:
        pipe.zadd(self.key("jobs", "queued"), {job_id: queued_at})
        pipe.expire(self.key("jobs", "queued"), self.ttl_s)

    def get_job(self, job_id: str) -> Job | None:
        """Return the job with its runs, or None when it does not exist."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.job_key(job_id))
        pipe.hgetall(self.job_key(job_id, "runs"))
        fields, runs = pipe.execute()
        if not fields:
            return None
        return self._job_from_fields(job_id, fields, runs)

    def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        """Return the jobs that still exist among ``job_ids``, in that order."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.job_key(job_id))
            pipe.hgetall(self.job_key(job_id, "runs"))
        replies = pipe.execute()
        jobs = []
        for index, job_id in enumerate(job_ids):
            fields, runs = replies[2 * index], replies[2 * index + 1]
            if fields:
                jobs.append(self._job_from_fields(job_id, fields, runs))
        return jobs

    @staticmethod
    def _job_from_fields(
        job_id: str, fields: dict[str, str], runs: dict[str, str]
    ) -> Job:
        spec = JobSpec.model_validate_json(fields["spec"])
        values: dict[str, Any] = {
            "id": job_id,
            "status": fields["status"],
            "spec": spec,
            "owner": fields.get("owner") or None,
            "attempts": int(fields.get("attempts", "0")),
            "partial": fields.get("partial") == "1",
        }
        for name in _FLOAT_FIELDS:
            if fields.get(name):
                values[name] = float(fields[name])
        for name in ("worker", "device", "reason", "error"):
            if fields.get(name):
                values[name] = fields[name]
        if fields.get("data"):
            values["data"] = DataReport.model_validate_json(fields["data"])
        states = [RunState.model_validate_json(text) for text in runs.values()]
        values["runs"] = _order_runs(spec, states)
        return Job(**values)

    def get_status(self, job_id: str) -> str | None:
        """Return the job's status, or None when it does not exist."""
        return self.client.hget(self.job_key(job_id), "status")

    def get_owner(self, job_id: str) -> str | None:
        """Return the job's owner ("" for none), or None when the job does not exist."""
        return self.client.hget(self.job_key(job_id), "owner")

    def get_field(self, job_id: str, name: str) -> str | None:
        return self.client.hget(self.job_key(job_id), name)

    def list_jobs(
        self,
        *,
        owner: str | None = None,
        status: str | None = None,
        limit: int = 50,
        offset: int = 0,
        all_owners: bool = False,
    ) -> tuple[list[Job], int]:
        """Return one page of jobs, newest first, and the number that match.

        With ``all_owners`` the listing covers every owner (an admin view);
        otherwise only ``owner``'s jobs.
        """
        index_key = self.key("jobs")
        if not all_owners:
            index_key = self.key("jobs", "owner", _owner_part(owner))
        self._prune_index(index_key)
        job_ids: list[str] = self.client.zrevrange(index_key, 0, -1)
        if status is not None:
            job_ids = self._filter_by_status(job_ids, status)
        page = job_ids[offset : offset + limit]
        return self.get_jobs(page), len(job_ids)

    def _prune_index(self, index_key: str) -> None:
        # Jobs older than the TTL have expired; their ids would only cost reads.
        self.client.zremrangebyscore(index_key, "-inf", _now() - self.ttl_s)

    def _filter_by_status(self, job_ids: list[str], status: str) -> list[str]:
        # NOTE: reads every listed job's status; fine for thousands of jobs,
        # per-status indexes would be needed for millions.
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.job_key(job_id), "status")
        statuses = pipe.execute()
        return [job_id for job_id, value in zip(job_ids, statuses) if value == status]

    def count_by_status(self) -> dict[str, int]:
        """Return the number of stored jobs in each status (for metrics)."""
        index_key = self.key("jobs")
        self._prune_index(index_key)
        job_ids = self.client.zrange(index_key, 0, -1)
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.job_key(job_id), "status")
        counts: dict[str, int] = {}
        for status in pipe.execute():
            if status:
                counts[status] = counts.get(status, 0) + 1
        return counts

    # Runs and points.

    def get_runs(self, job_id: str) -> dict[str, RunState]:
        """Return the job's run states by run name."""
        runs = self.client.hgetall(self.job_key(job_id, "runs"))
        return {name: RunState.model_validate_json(text) for name, text in runs.items()}

    def put_run(self, job_id: str, run_name: str, state: RunState) -> None:
        """Replace one run's state and emit a "run" event."""
        pipe = self.client.pipeline()
        pipe.hset(self.job_key(job_id, "runs"), run_name, state.model_dump_json())
        self._add_event(pipe, job_id, "run", _run_event(run_name, state))
        self._expire_job_keys(pipe, job_id, "runs", "events")
        pipe.execute()

    def get_points(self, job_id: str, run_name: str, start: int = 0) -> list[Point]:
        """Return one run's points from index ``start`` on."""
        texts = self.client.lrange(self.points_key(job_id, run_name), start, -1)
        return [Point.model_validate_json(text) for text in texts]

    def get_all_points(
        self, job_id: str, run_names: Iterable[str]
    ) -> dict[str, list[Point]]:
        """Return the points of several runs in one round trip."""
        names = list(run_names)
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.lrange(self.points_key(job_id, name), 0, -1)
        replies = pipe.execute()
        return {
            name: [Point.model_validate_json(text) for text in texts]
            for name, texts in zip(names, replies)
        }

    def count_points(self, job_id: str, run_name: str) -> int:
        return int(self.client.llen(self.points_key(job_id, run_name)))

    def record_progress(
        self,
        job_id: str,
        run_name: str,
        points: Sequence[Point],
        state: RunState,
        *,
        start: int | None = None,
    ) -> None:
        """Append a batch of points and the run's new state in one round trip.

        Emits a "points" event with the batch and a "progress" event with the
        run's step, so that a stream reader sees both in order.

        Args:
            start: Index of the batch's first point in the run's curve. The
                curve is first cut to that length, so a batch written twice
                (a retry after a reply lost to a dropped connection) is
                stored once.
        """
        pipe = self.client.pipeline()
        points_key = self.points_key(job_id, run_name)
        if points and start is not None:
            if start == 0:
                pipe.delete(points_key)
            else:
                pipe.ltrim(points_key, 0, start - 1)
        if points:
            pipe.rpush(points_key, *(point.model_dump_json() for point in points))
            pipe.expire(points_key, self.ttl_s)
            batch = [point.model_dump(mode="json") for point in points]
            self._add_event(pipe, job_id, "points", {"run": run_name, "points": batch})
        pipe.hset(self.job_key(job_id, "runs"), run_name, state.model_dump_json())
        progress = {"run": run_name, "step": state.step, "num_iter": state.num_iter}
        if points:
            progress["loss"] = points[-1].loss
            progress["lr"] = points[-1].lr
        self._add_event(pipe, job_id, "progress", progress)
        self._expire_job_keys(pipe, job_id, "runs", "events")
        pipe.execute()

    def reset_run(self, job_id: str, run_name: str, state: RunState) -> None:
        """Drop a run's earlier points and store its new state (a restart)."""
        pipe = self.client.pipeline()
        pipe.delete(self.points_key(job_id, run_name))
        pipe.hset(self.job_key(job_id, "runs"), run_name, state.model_dump_json())
        self._add_event(pipe, job_id, "run", _run_event(run_name, state, reset=True))
        self._expire_job_keys(pipe, job_id, "runs", "events")
        pipe.execute()

    def close_unfinished_runs(
        self,
        job_id: str,
        status: str,
        stop_reason: str,
        error: str | None = None,
        *,
        names: Iterable[str] | None = None,
        unfinished: Sequence[str] = ("pending", "running"),
    ) -> list[str]:
        """Give unfinished runs a final status; return their names.

        Args:
            names: The runs to consider; default every run of the job.
            unfinished: The run statuses that are closed.
        """
        closed = []
        wanted = None if names is None else set(names)
        for name, state in self.get_runs(job_id).items():
            if state.status not in unfinished:
                continue
            if wanted is not None and name not in wanted:
                continue
            state.status = status  # type: ignore[assignment]
            state.stop_reason = stop_reason  # type: ignore[assignment]
            state.error = error
            self.put_run(job_id, name, state)
            closed.append(name)
        return closed

    def set_data_report(self, job_id: str, report: DataReport) -> None:
        self.client.hset(self.job_key(job_id), "data", report.model_dump_json())

    def set_gradient_noise(self, job_id: str, report: dict[str, Any]) -> None:
        """Store the study's gradient noise measurement (or its error) on the job."""
        self.client.hset(self.job_key(job_id), "gradient_noise", json.dumps(report))

    def get_gradient_noise(self, job_id: str) -> dict[str, Any] | None:
        """Return the job's gradient noise measurement, or None when none was stored."""
        text = self.client.hget(self.job_key(job_id), "gradient_noise")
        return json.loads(text) if text else None

    # Events.

    def _add_event(
        self, pipe: Any, job_id: str, event_type: str, data: dict[str, Any]
    ) -> None:
        pipe.xadd(
            self.job_key(job_id, "events"),
            {"type": event_type, "data": json.dumps(data)},
            maxlen=EVENTS_MAXLEN,
            approximate=True,
        )

    def add_event(self, job_id: str, event_type: str, data: dict[str, Any]) -> str:
        """Append one event to the job's stream and return its id."""
        if event_type not in EVENT_TYPES:
            raise ValueError(
                f"event type {event_type!r} is invalid: use one of {EVENT_TYPES}"
            )
        pipe = self.client.pipeline()
        self._add_event(pipe, job_id, event_type, data)
        self._expire_job_keys(pipe, job_id, "events")
        return pipe.execute()[0]

    def read_events(
        self,
        job_id: str,
        after: str = "0-0",
        *,
        count: int = 500,
        block_ms: int | None = None,
    ) -> list[Event]:
        """Return up to ``count`` events after the stream id ``after``.

        With ``block_ms`` the call waits that long for a first new event;
        ``after="$"`` waits for events newer than the call.
        """
        stream = self.job_key(job_id, "events")
        reply = self.client.xread({stream: after}, count=count, block=block_ms)
        if not reply:
            return []
        entries = reply[0][1]
        return [
            Event(id=entry_id, type=fields["type"], data=json.loads(fields["data"]))
            for entry_id, fields in entries
        ]

    # Status transitions.

    def mark_running(
        self, job_id: str, *, worker: str, device: str, max_attempts: int
    ) -> str:
        """Move a queued (or abandoned running) job to running.

        Returns the job's status afterwards: "running" when this execution
        may run it; anything else means it must not run. A job whose
        executions already reached ``max_attempts`` is failed as
        ``worker_lost`` instead. The caller holds the job's lock.
        """

        def transition(pipe: Any) -> str:
            fields = pipe.hgetall(self.job_key(job_id))
            if not fields:
                raise StoreError(f"job {job_id!r} not found")
            status = fields["status"]
            if status in FINAL_JOB_STATUSES:
                return status
            attempts = int(fields.get("attempts", "0"))
            if attempts >= max_attempts:
                runs = pipe.hgetall(self.job_key(job_id, "runs"))
                pipe.multi()
                self._fail_lost(pipe, job_id, fields, runs)
                return "failed"
            pipe.multi()
            self._start(pipe, job_id, fields, worker, device)
            return "running"

        return self.client.transaction(
            transition,
            self.job_key(job_id),
            self.job_key(job_id, "runs"),
            value_from_callable=True,
        )

    def _start(
        self,
        pipe: Any,
        job_id: str,
        fields: dict[str, str],
        worker: str,
        device: str,
    ) -> None:
        now = _now()
        attempts = int(fields.get("attempts", "0")) + 1
        values = {
            "status": "running",
            "worker": worker,
            "device": device,
            "attempts": str(attempts),
        }
        # The first start stays: the job's time budget counts from it.
        if not fields.get("started_at"):
            values["started_at"] = repr(now)
        pipe.hset(self.job_key(job_id), mapping=values)
        pipe.zadd(self.key("jobs", "running"), {job_id: now})
        pipe.expire(self.key("jobs", "running"), self.ttl_s)
        pipe.zrem(self.key("jobs", "queued"), job_id)
        event = {
            "status": "running",
            "worker": worker,
            "device": device,
            "attempts": attempts,
        }
        self._add_event(pipe, job_id, "status", event)
        self._expire_job_keys(pipe, job_id, "events")

    def finish_job(
        self,
        job_id: str,
        status: str,
        *,
        reason: str | None = None,
        error: str | None = None,
        partial: bool = False,
    ) -> bool:
        """Set a final status; return False when the job had one already."""
        if status not in FINAL_JOB_STATUSES:
            raise ValueError(
                f"status {status!r} is not final: use one of {sorted(FINAL_JOB_STATUSES)}"
            )

        def transition(pipe: Any) -> bool:
            fields = pipe.hgetall(self.job_key(job_id))
            if not fields:
                raise StoreError(f"job {job_id!r} not found")
            if fields["status"] in FINAL_JOB_STATUSES:
                return False
            pipe.multi()
            self._finish(pipe, job_id, fields, status, reason, error, partial)
            return True

        return self.client.transaction(
            transition, self.job_key(job_id), value_from_callable=True
        )

    def _finish(
        self,
        pipe: Any,
        job_id: str,
        fields: dict[str, str],
        status: str,
        reason: str | None,
        error: str | None,
        partial: bool = False,
    ) -> None:
        values = {
            "status": status,
            "finished_at": repr(_now()),
            "partial": "1" if partial else "0",
        }
        if reason is not None:
            values["reason"] = reason
        if error is not None:
            values["error"] = error
        pipe.hset(self.job_key(job_id), mapping=values)
        pipe.srem(self.key("active", _owner_part(fields.get("owner"))), job_id)
        pipe.zrem(self.key("jobs", "running"), job_id)
        pipe.zrem(self.key("jobs", "queued"), job_id)
        event = {"status": status, "reason": reason, "error": error, "partial": partial}
        self._add_event(pipe, job_id, "status", event)
        self._add_event(pipe, job_id, "end", event)
        self._expire_job_keys(pipe, job_id, "events")

    # Fan-out jobs: each run is a task of its own.

    def start_fan_out_run(
        self,
        job_id: str,
        run_name: str,
        *,
        worker: str,
        device: str,
        max_attempts: int,
    ) -> str:
        """Mark a fan-out job running for one of its runs; the caller holds the run's lock.

        Returns "running" when the run may start, "skipped" when the run has
        already ended, or the job's status when it must not run: a final
        status, or "failed" when its executions reached ``max_attempts``.
        The first run to start counts the job's attempt and moves it from
        queued to running; the others leave the job as it is.
        """

        def transition(pipe: Any) -> str:
            fields = pipe.hgetall(self.job_key(job_id))
            if not fields:
                raise StoreError(f"job {job_id!r} not found")
            status = fields["status"]
            if status in FINAL_JOB_STATUSES:
                return status
            text = pipe.hget(self.job_key(job_id, "runs"), run_name)
            if text is None or RunState.model_validate_json(text).status not in (
                "pending",
                "running",
            ):
                return "skipped"
            if status == "running":
                pipe.multi()
                self._add_run_start(pipe, job_id, run_name, worker, device)
                return "running"
            return self._start_fan_out(
                pipe, job_id, fields, run_name, worker, device, max_attempts
            )

        return self.client.transaction(
            transition,
            self.job_key(job_id),
            self.job_key(job_id, "runs"),
            value_from_callable=True,
        )

    def _start_fan_out(
        self,
        pipe: Any,
        job_id: str,
        fields: dict[str, str],
        run_name: str,
        worker: str,
        device: str,
        max_attempts: int,
    ) -> str:
        if int(fields.get("attempts", "0")) >= max_attempts:
            runs = pipe.hgetall(self.job_key(job_id, "runs"))
            pipe.multi()
            self._fail_lost(pipe, job_id, fields, runs)
            return "failed"
        pipe.multi()
        self._start(pipe, job_id, fields, worker, device)
        self._add_run_start(pipe, job_id, run_name, worker, device)
        return "running"

    def _add_run_start(
        self, pipe: Any, job_id: str, run_name: str, worker: str, device: str
    ) -> None:
        # Written as a status event so that readers see which worker ran
        # which run of a fan-out job.
        event = {
            "status": "running",
            "run": run_name,
            "worker": worker,
            "device": device,
        }
        self._add_event(pipe, job_id, "status", event)
        # Every run's execution refreshes the job's heartbeat; this first
        # beat keeps the reaper off the job before the run's heartbeat
        # thread starts.
        value = json.dumps({"worker": worker, "time": _now()})
        timeout_ms = int(self.heartbeat_timeout_s * 1000)
        pipe.set(self.job_key(job_id, "heartbeat"), value, px=timeout_ms)

    def conclude_fan_out(self, job_id: str) -> str | None:
        """Give a fan-out job its final status once every run has ended.

        The transaction watches the job and its runs, so of the executions
        that end the last runs at the same time exactly one sets the status.

        Returns:
            The final status this call set, or None when a run is still
            pending or running, or the job already had a final status.
        """

        def transition(pipe: Any) -> str | None:
            fields = pipe.hgetall(self.job_key(job_id))
            if not fields or fields["status"] in FINAL_JOB_STATUSES:
                return None
            runs = pipe.hgetall(self.job_key(job_id, "runs"))
            states = [RunState.model_validate_json(text) for text in runs.values()]
            if _any_unfinished(states):
                return None
            cancelled = bool(pipe.exists(self.job_key(job_id, "cancel")))
            pipe.multi()
            return self._finish_fan_out(pipe, job_id, fields, states, cancelled)

        return self.client.transaction(
            transition,
            self.job_key(job_id),
            self.job_key(job_id, "runs"),
            self.job_key(job_id, "cancel"),
            value_from_callable=True,
        )

    def _finish_fan_out(
        self,
        pipe: Any,
        job_id: str,
        fields: dict[str, str],
        states: list[RunState],
        cancelled: bool,
    ) -> str:
        status, reason, error, partial = _fan_out_outcome(
            states, cancelled, int(fields.get("attempts", "0"))
        )
        self._finish(pipe, job_id, fields, status, reason, error, partial)
        return status

    def find_lost_runs(self, job_id: str) -> list[str]:
        """Return the runs of a running fan-out job whose execution went silent.

        A run is lost when it is marked running and no execution holds its
        lock, while the job still has a heartbeat because another of its
        runs is alive.
        Without a heartbeat every execution of the job went silent, and the
        job as a whole is lost (``is_lost``). Returns [] for other jobs.
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.job_key(job_id), "status", "spec")
        pipe.exists(self.job_key(job_id, "heartbeat"))
        pipe.hgetall(self.job_key(job_id, "runs"))
        (status, spec), heartbeat, runs = pipe.execute()
        if status != "running" or not heartbeat or not _is_fan_out(spec):
            return []
        running = [
            name
            for name, text in runs.items()
            if RunState.model_validate_json(text).status == "running"
        ]
        pipe = self.client.pipeline(transaction=False)
        for name in running:
            pipe.exists(self.lock_key(job_id, name))
        return [name for name, held in zip(running, pipe.execute()) if not held]

    def waits_for_runs(self, job_id: str) -> bool:
        """Return True for a fan-out job with pending runs and none running."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.job_key(job_id))
        pipe.hgetall(self.job_key(job_id, "runs"))
        fields, runs = pipe.execute()
        return _waits_for_runs(fields, runs)

    def recover_lost_run(
        self, job_id: str, run_name: str, *, max_attempts: int
    ) -> str | None:
        """End or re-queue one run of a fan-out job whose execution went silent.

        The rules are those of ``recover_lost_job``, for the one run: the
        transaction watches the job, its runs, its heartbeat, its cancel
        flag and the run's lock, so an execution that takes the run
        meanwhile wins and nothing changes. A re-queue counts one of the
        job's attempts, because the run's next execution is a new one. The
        run's partial curve stays until that execution starts it again. A
        run ended here that was the job's last unfinished run gives the job
        its final status, as ``conclude_fan_out`` would.

        Returns:
            "cancelled" when a cancellation was requested, "failed" (stop
            reason ``worker_lost``) when the job's attempts reached
            ``max_attempts``, and "requeued" otherwise. A re-queued run is
            pending, and the caller sends its message next. None means that
            the run is not lost, or that the whole job is lost (see
            ``recover_lost_job``).
        """

        def transition(pipe: Any) -> str | None:
            fields = pipe.hgetall(self.job_key(job_id))
            if fields.get("status") != "running" or not _is_fan_out(fields["spec"]):
                return None
            if not pipe.exists(self.job_key(job_id, "heartbeat")):
                return None
            if pipe.exists(self.lock_key(job_id, run_name)):
                return None
            runs = pipe.hgetall(self.job_key(job_id, "runs"))
            text = runs.get(run_name)
            if text is None:
                return None
            state = RunState.model_validate_json(text)
            if state.status != "running":
                return None

            cancelled = bool(pipe.exists(self.job_key(job_id, "cancel")))
            attempts = int(fields.get("attempts", "0"))
            if cancelled:
                outcome, status, stop_reason, error = (
                    "cancelled", "cancelled", "cancelled", None
                )
            elif attempts >= max_attempts:
                outcome, status, stop_reason = "failed", "failed", "worker_lost"
                error = _lost_message(attempts)
            else:
                outcome, status, stop_reason, error = (
                    "requeued", "pending", "worker_lost", None
                )
            state.status = status  # type: ignore[assignment]
            state.stop_reason = stop_reason  # type: ignore[assignment]
            state.error = error

            pipe.multi()
            runs[run_name] = state.model_dump_json()
            pipe.hset(self.job_key(job_id, "runs"), run_name, runs[run_name])
            self._add_event(pipe, job_id, "run", _run_event(run_name, state))
            self._expire_job_keys(pipe, job_id, "runs", "events")
            if outcome == "requeued":
                pipe.hset(self.job_key(job_id), "attempts", str(attempts + 1))
                return outcome
            states = [RunState.model_validate_json(value) for value in runs.values()]
            if not _any_unfinished(states):
                self._finish_fan_out(pipe, job_id, fields, states, cancelled)
            return outcome

        watched = ("", ":runs", ":heartbeat", ":cancel", f":lock:{run_name}")
        return self.client.transaction(
            transition,
            *(self.job_key(job_id) + suffix for suffix in watched),
            value_from_callable=True,
        )

    def interrupt_fan_out_run(self, job_id: str, run_name: str, token: str) -> bool:
        """Put a run that a shutdown interrupted back to pending and give up its lock.

        When no other run of the job is running or held by an execution,
        the job goes back to queued too and gets its attempt back, as a
        sequential job does after a shutdown. The transaction watches every
        run's lock, so of two executions interrupted at once the last one
        re-queues the job.

        Returns:
            True when the job went back to queued.
        """
        lock = self.lock_key(job_id, run_name)

        def transition(pipe: Any) -> bool:
            fields = pipe.hgetall(self.job_key(job_id))
            runs = pipe.hgetall(self.job_key(job_id, "runs"))
            others = [self.lock_key(job_id, name) for name in runs if name != run_name]
            if others:
                pipe.watch(*others)
            held_elsewhere = bool(others) and pipe.exists(*others) > 0
            owned = pipe.get(lock) == token
            states = {
                name: RunState.model_validate_json(text) for name, text in runs.items()
            }

            pipe.multi()
            state = states.get(run_name)
            if state is not None and state.status in ("pending", "running"):
                state.status, state.stop_reason = "pending", "interrupted"
                text = state.model_dump_json()
                pipe.hset(self.job_key(job_id, "runs"), run_name, text)
                self._add_event(pipe, job_id, "run", _run_event(run_name, state))
                self._expire_job_keys(pipe, job_id, "runs", "events")
            if owned:
                pipe.delete(lock)

            running_elsewhere = any(
                other.status == "running"
                for name, other in states.items()
                if name != run_name
            )
            if fields.get("status") != "running" or held_elsewhere or running_elsewhere:
                return False
            attempts = max(int(fields.get("attempts", "0")) - 1, 0)
            self._requeue(pipe, job_id, attempts, "interrupted")
            return True

        return self.client.transaction(
            transition,
            self.job_key(job_id),
            self.job_key(job_id, "runs"),
            lock,
            value_from_callable=True,
        )

    def requeue_job(self, job_id: str, *, reason: str, count_attempt: bool) -> bool:
        """Move a running job back to queued; return False unless it was running.

        Args:
            reason: Why it was re-queued ("interrupted", "worker_lost"), sent
                in the status event.
            count_attempt: False gives the execution's attempt back, as for a
                graceful worker shutdown.
        """

        def transition(pipe: Any) -> bool:
            fields = pipe.hgetall(self.job_key(job_id))
            if fields.get("status") != "running":
                return False
            attempts = int(fields.get("attempts", "0"))
            if not count_attempt:
                attempts = max(attempts - 1, 0)
            pipe.multi()
            self._requeue(pipe, job_id, attempts, reason)
            return True

        return self.client.transaction(
            transition, self.job_key(job_id), value_from_callable=True
        )

    def _requeue(self, pipe: Any, job_id: str, attempts: int, reason: str) -> None:
        pipe.hset(
            self.job_key(job_id),
            mapping={"status": "queued", "attempts": str(attempts)},
        )
        pipe.hdel(self.job_key(job_id), "worker", "device")
        pipe.zrem(self.key("jobs", "running"), job_id)
        self._index_queued(pipe, job_id, _now())
        event = {"status": "queued", "reason": reason, "attempts": attempts}
        self._add_event(pipe, job_id, "status", event)
        self._expire_job_keys(pipe, job_id, "events")

    def running_job_ids(self) -> list[str]:
        """Return the ids of jobs marked running, oldest first."""
        return self.client.zrange(self.key("jobs", "running"), 0, -1)

    def queued_job_ids(self) -> list[str]:
        """Return the ids of queued jobs, oldest first."""
        return self.client.zrange(self.key("jobs", "queued"), 0, -1)

    def find_waiting_messages(self, job_ids: Iterable[str]) -> set[str]:
        """Return the ids among ``job_ids`` that a message waiting in a queue names.

        Reads every Redis list outside this store's keys, which with Celery's
        Redis transport are the queues; each message contains its task's
        arguments as text. Messages a worker has taken but not acknowledged
        are not counted.

        NOTE: relies on Kombu's Redis layout (one list per queue and
        priority, messages as JSON text), checked with Kombu 5.7.
        """
        wanted = set(job_ids)
        found: set[str] = set()
        if not wanted:
            return found
        for key in self.client.scan_iter(count=500, _type="list"):
            if key.startswith(PREFIX):
                continue
            for message in self.client.lrange(key, 0, -1):
                found.update(wanted.intersection(_JOB_ID.findall(message)))
        return found

    # Jobs whose execution went silent.

    def is_lost(self, job_id: str) -> bool:
        """Return True when a running job has neither a heartbeat nor a lock holder."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(self.job_key(job_id), "status")
        pipe.exists(self.job_key(job_id, "heartbeat"), self.job_key(job_id, "lock"))
        status, alive = pipe.execute()
        return status == "running" and alive == 0

    def recover_lost_job(self, job_id: str, *, max_attempts: int) -> str | None:
        """End or re-queue a running job whose execution went silent.

        The transaction watches the job's lock and heartbeat, so an
        execution that takes the job meanwhile wins and nothing changes.

        A fan-out job none of whose runs was running (they all ended or
        wait, pending, for a worker) lost no execution: it is re-queued
        with its attempt given back, as after a shutdown.

        Returns:
            "cancelled" when a cancellation was requested, "failed" (reason
            ``worker_lost``) when the job's executions reached
            ``max_attempts``, "requeued" otherwise, and None when the job is
            not running or not lost. Succeeded runs and every stored point
            stay; the caller sends the message of a re-queued job.
        """

        def transition(pipe: Any) -> str | None:
            fields = pipe.hgetall(self.job_key(job_id))
            if fields.get("status") != "running":
                return None
            heartbeat = self.job_key(job_id, "heartbeat")
            if pipe.exists(heartbeat, self.job_key(job_id, "lock")):
                return None
            runs = pipe.hgetall(self.job_key(job_id, "runs"))
            cancel = pipe.exists(self.job_key(job_id, "cancel"))
            attempts = int(fields.get("attempts", "0"))
            pipe.multi()
            if cancel:
                self._close_runs(pipe, job_id, runs, "cancelled", "cancelled")
                partial = _any_succeeded(runs)
                self._finish(
                    pipe, job_id, fields, "cancelled", "cancelled", None, partial
                )
                return "cancelled"
            if _waits_for_runs(fields, runs):
                # No run of this fan-out job was running, so no execution
                # was lost: its pending runs wait for a worker, and the job
                # waits as queued with its attempt given back.
                self._requeue(pipe, job_id, max(attempts - 1, 0), "interrupted")
                return "requeued"
            if attempts >= max_attempts:
                self._fail_lost(pipe, job_id, fields, runs)
                return "failed"
            self._requeue(pipe, job_id, attempts, "worker_lost")
            return "requeued"

        watched = ("", ":runs", ":lock", ":heartbeat", ":cancel")
        return self.client.transaction(
            transition,
            *(self.job_key(job_id) + suffix for suffix in watched),
            value_from_callable=True,
        )

    def _fail_lost(
        self, pipe: Any, job_id: str, fields: dict[str, str], runs: dict[str, str]
    ) -> None:
        message = _lost_message(int(fields.get("attempts", "0")))
        self._close_runs(pipe, job_id, runs, "failed", "worker_lost", message)
        partial = _any_succeeded(runs)
        self._finish(pipe, job_id, fields, "failed", "worker_lost", message, partial)

    def _close_runs(
        self,
        pipe: Any,
        job_id: str,
        runs: dict[str, str],
        status: str,
        stop_reason: str,
        error: str | None = None,
    ) -> None:
        """Queue the final state of every pending or running run in ``runs``."""
        for name, text in runs.items():
            state = RunState.model_validate_json(text)
            if state.status not in ("pending", "running"):
                continue
            state.status = status  # type: ignore[assignment]
            state.stop_reason = stop_reason  # type: ignore[assignment]
            state.error = error
            pipe.hset(self.job_key(job_id, "runs"), name, state.model_dump_json())
            self._add_event(pipe, job_id, "run", _run_event(name, state))

    # Cancellation.

    def request_cancel(self, job_id: str) -> str:
        """Ask for a job to stop and return its status afterwards.

        A queued job is cancelled at once (its pending runs too); a running
        job gets the cancel flag, which its worker checks before every step.
        A finished job is left as it is.
        """

        def transition(pipe: Any) -> str:
            fields = pipe.hgetall(self.job_key(job_id))
            if not fields:
                raise StoreError(f"job {job_id!r} not found")
            status = fields["status"]
            if status in FINAL_JOB_STATUSES:
                return status
            runs = pipe.hgetall(self.job_key(job_id, "runs"))
            pipe.multi()
            pipe.set(self.job_key(job_id, "cancel"), "1", ex=self.ttl_s)
            if status == "running":
                return status
            # A queued job may hold succeeded runs and partial curves from an
            # interrupted execution; they stay, as after a cancel mid-run.
            self._close_runs(pipe, job_id, runs, "cancelled", "cancelled")
            partial = _any_succeeded(runs)
            self._finish(pipe, job_id, fields, "cancelled", "cancelled", None, partial)
            return "cancelled"

        return self.client.transaction(
            transition,
            self.job_key(job_id),
            self.job_key(job_id, "runs"),
            value_from_callable=True,
        )

    def is_cancel_requested(self, job_id: str) -> bool:
        return bool(self.client.exists(self.job_key(job_id, "cancel")))

    # Lock and heartbeat of a running job.

    def lock_key(self, job_id: str, run_name: str | None = None) -> str:
        """Return the lock of the job, or of one of its runs when fanned out."""
        if run_name is None:
            return self.job_key(job_id, "lock")
        return self.job_key(job_id, "lock", run_name)

    def acquire_lock(
        self, job_id: str, token: str, run_name: str | None = None
    ) -> bool:
        """Take the job's (or run's) lock; False when another execution holds it."""
        timeout_ms = int(self.heartbeat_timeout_s * 1000)
        key = self.lock_key(job_id, run_name)
        return bool(self.client.set(key, token, nx=True, px=timeout_ms))

    def refresh_lock(
        self, job_id: str, token: str, run_name: str | None = None
    ) -> bool:
        """Extend the lock's lifetime; False when this execution lost it."""
        timeout_ms = int(self.heartbeat_timeout_s * 1000)
        key = self.lock_key(job_id, run_name)
        return bool(self._refresh_lock(keys=[key], args=[token, timeout_ms]))

    def release_lock(
        self, job_id: str, token: str, run_name: str | None = None
    ) -> bool:
        key = self.lock_key(job_id, run_name)
        return bool(self._release_lock(keys=[key], args=[token]))

    def lock_holder(self, job_id: str, run_name: str | None = None) -> str | None:
        return self.client.get(self.lock_key(job_id, run_name))

    def beat(self, job_id: str, worker: str) -> None:
        """Write the job's heartbeat; it expires after heartbeat_timeout_s."""
        value = json.dumps({"worker": worker, "time": _now()})
        timeout_ms = int(self.heartbeat_timeout_s * 1000)
        self.client.set(self.job_key(job_id, "heartbeat"), value, px=timeout_ms)

    def get_heartbeat(self, job_id: str) -> dict[str, Any] | None:
        text = self.client.get(self.job_key(job_id, "heartbeat"))
        return json.loads(text) if text else None

    # Quotas.

    def active_job_ids(self, owner: str | None) -> set[str]:
        """Return the owner's queued and running job ids."""
        return set(self.client.smembers(self.key("active", _owner_part(owner))))

    def count_active(self, owner: str | None) -> int:
        return int(self.client.scard(self.key("active", _owner_part(owner))))

    def count_submission(self, owner: str | None, now: float | None = None) -> int:
        """Count one submission in the current minute and return the minute's total."""
        minute = int((now if now is not None else _now()) // 60)
        key = self.key("rate", _owner_part(owner), str(minute))
        pipe = self.client.pipeline()
        pipe.incr(key)
        pipe.expire(key, RATE_WINDOW_TTL_S)
        return int(pipe.execute()[0])

    # Workers.

    def register_worker(self, name: str, info: dict[str, Any]) -> None:
        """Write or refresh the worker's presence key (expires after WORKER_TTL_S)."""
        value = json.dumps({**info, "name": name, "time": _now()})
        self.client.set(self.key("worker", name), value, ex=WORKER_TTL_S)

    def unregister_worker(self, name: str) -> None:
        self.client.delete(self.key("worker", name))

    def live_workers(self) -> list[dict[str, Any]]:
        """Return the presence records of workers seen in the last WORKER_TTL_S."""
        keys = list(self.client.scan_iter(match=self.key("worker", "*"), count=100))
        if not keys:
            return []
        values = self.client.mget(keys)
        return [json.loads(value) for value in values if value]


def _order_runs(spec: JobSpec, states: list[RunState]) -> list[RunState]:
    """Sort run states in the spec's execution order."""
    order = {
        (key.batch_size, key.repeat): index for index, key in enumerate(spec.run_keys())
    }
    return sorted(
        states,
        key=lambda state: order.get((state.batch_size, state.repeat), len(order)),
    )


def _any_succeeded(runs: dict[str, str]) -> bool:
    return any(
        RunState.model_validate_json(text).status == "succeeded"
        for text in runs.values()
    )


def _run_event(
    run_name: str, state: RunState, *, reset: bool = False
) -> dict[str, Any]:
    data = {"run": run_name, **state.model_dump(mode="json")}
    if reset:
        data["reset"] = True
    return data


def _any_unfinished(states: Iterable[RunState]) -> bool:
    return any(state.status in ("pending", "running") for state in states)


def _is_fan_out(spec_text: str | None) -> bool:
    if not spec_text:
        return False
    return bool(json.loads(spec_text).get("runtime", {}).get("fan_out"))


def _waits_for_runs(fields: dict[str, str], runs: dict[str, str]) -> bool:
    """Return True for a fan-out job with pending runs and none running."""
    if not _is_fan_out(fields.get("spec")):
        return False
    states = [RunState.model_validate_json(text) for text in runs.values()]
    statuses = {state.status for state in states}
    return "pending" in statuses and "running" not in statuses


def _fan_out_outcome(
    states: list[RunState], cancelled: bool, attempts: int = 0
) -> tuple[str, str | None, str | None, bool]:
    """Return the status, reason, error and partial flag of an ended fan-out job.

    A run failed as ``worker_lost`` fails the job with that reason, as a
    sequential job fails once its executions were lost too often.
    """
    succeeded = [state for state in states if state.status == "succeeded"]
    partial = len(succeeded) < len(states)
    if cancelled:
        return "cancelled", "cancelled", None, bool(succeeded)
    if any(state.stop_reason == "worker_lost" for state in states):
        return "failed", "worker_lost", _lost_message(attempts), bool(succeeded)
    if succeeded:
        time_limit = any(state.stop_reason == "time_limit" for state in states)
        return "succeeded", "time_limit" if time_limit else None, None, partial
    details = "; ".join(
        f"batch size {state.batch_size}: {state.stop_reason}"
        + (f" ({state.error})" if state.error else "")
        for state in states
    )
    reason = states[0].stop_reason if states else None
    return "failed", reason or "error", f"no run succeeded: {details}", False


def _lost_message(attempts: int) -> str:
    return (
        f"the job's worker stopped responding during each of its {attempts} "
        "attempts; resubmit it, or raise LRFINDER_MAX_ATTEMPTS if workers are "
        "restarted often"
    )
