"""Reads and writes the API needs beyond lrfinder.store, on the same keys."""

from __future__ import annotations

import json
import time

from lrfinder.store import NO_OWNER, Store


def active_key(store: Store, owner: str | None) -> str:
    return store.key("active", owner or NO_OWNER)


def reserve_active_slot(store: Store, owner: str, job_id: str, limit: int) -> bool:
    """Add ``job_id`` to the owner's active jobs unless that exceeds ``limit``.

    The add and the count run in one transaction, so two racing submissions
    can never both take the last slot (at worst both are rejected).
    """
    key = active_key(store, owner)
    pipe = store.client.pipeline()
    pipe.sadd(key, job_id)
    pipe.scard(key)
    pipe.expire(key, store.ttl_s)
    _, count, _ = pipe.execute()
    if count <= limit:
        return True
    store.client.srem(key, job_id)
    return False


def release_active_slot(store: Store, owner: str, job_id: str) -> None:
    """Give back a slot taken by reserve_active_slot for a job never stored."""
    store.client.srem(active_key(store, owner), job_id)


def steps_per_second(store: Store, window_s: float = 60.0) -> float:
    """Return the optimizer steps per second of all running jobs.

    Measured from the "progress" events of the last ``window_s`` seconds:
    per run, the steps between its first and last event in the window over
    the time between them (stream ids carry milliseconds).
    """
    since_ms = int((time.time() - window_s) * 1000)
    total = 0.0
    for job_id in store.running_job_ids():
        entries = store.client.xrange(store.job_key(job_id, "events"), min=since_ms)
        total += _rate_of_entries(entries)
    return total


def _rate_of_entries(entries: list[tuple[str, dict[str, str]]]) -> float:
    first: dict[str, tuple[int, int]] = {}
    last: dict[str, tuple[int, int]] = {}
    for entry_id, fields in entries:
        if fields.get("type") != "progress":
            continue
        data = json.loads(fields["data"])
        sample = (int(entry_id.split("-")[0]), int(data["step"]))
        first.setdefault(data["run"], sample)
        last[data["run"]] = sample
    rate = 0.0
    for run, (start_ms, start_step) in first.items():
        end_ms, end_step = last[run]
        if end_ms > start_ms and end_step > start_step:
            rate += (end_step - start_step) / ((end_ms - start_ms) / 1000)
    return rate
