"""Sending jobs to the workers through Celery, by task name.

The API builds its own Celery client with the workers' broker and queue
instead of importing ``worker.app``, so that an API host needs neither the
worker package nor torch.
"""

from __future__ import annotations

from celery import Celery

from lrfinder.delivery import RUN_JOB_TASK, visibility_timeout_s
from lrfinder.settings import Settings


class JobQueue:
    """Publishes ``lrfinder.run_job`` tasks; connects on the first send."""

    def __init__(self, settings: Settings) -> None:
        self.queue = settings.queue
        self.celery = Celery(
            "lrfinder-api", broker=settings.redis_url, set_as_current=False
        )
        self.celery.conf.update(
            task_default_queue=settings.queue,
            task_ignore_result=True,
            task_serializer="json",
            # Retry a failed publish briefly; the caller reports the job failed.
            task_publish_retry_policy={
                "max_retries": 2,
                "interval_start": 0.2,
                "interval_step": 0.5,
                "interval_max": 1.0,
            },
            broker_connection_timeout=5.0,
            broker_transport_options={
                "visibility_timeout": visibility_timeout_s(settings),
            },
        )

    def send(self, job_id: str) -> None:
        """Queue one execution of the job (blocking network I/O)."""
        self.celery.send_task(RUN_JOB_TASK, args=[job_id], queue=self.queue)

    def close(self) -> None:
        self.celery.close()
