"""The Celery task that runs one LR-finder job."""

from __future__ import annotations

import functools
import logging
from typing import Any

from lrfinder.delivery import RUN_JOB_TASK
from lrfinder.errors import StudyError
from lrfinder.settings import get_settings
from worker import presence
from worker.app import app
from worker.execution import JobExecution
from worker.fan_out import RunExecution, dispatch_runs, is_fan_out

logger = logging.getLogger(__name__)


@app.task(name=RUN_JOB_TASK, bind=True, ignore_result=True)
def run_job(self: Any, job_id: str, run_name: str | None = None) -> str:
    """Run the job ``job_id``, or its run ``run_name`` for a fan-out job.

    Nothing runs when another execution has the job (or run) or it is
    finished. A fan-out job's own message sends one message per run.
    """
    # Imported here so that loading the task module costs no torch import.
    from lrfinder.study import run_study

    delivery = self.request.delivery_info or {}
    queue = delivery.get("routing_key") or get_settings().queue
    if delivery.get("redelivered"):
        logger.warning("job %s: message delivered again", job_id)

    def send(requeued_id: str, requeued_run: str | None = None) -> None:
        arguments = (
            [requeued_id] if requeued_run is None else [requeued_id, requeued_run]
        )
        app.send_task(RUN_JOB_TASK, args=arguments, queue=queue)

    store = presence.get_store()
    options: dict[str, Any] = {
        "store": store,
        "settings": get_settings(),
        "shutdown": presence.SHUTDOWN,
        "run_study": run_study,
        "study_error": StudyError,
    }
    if run_name is not None:
        requeue_run = functools.partial(send, requeued_run=run_name)
        return RunExecution(job_id, run_name, requeue=requeue_run, **options).run()
    if is_fan_out(store, job_id):
        return dispatch_runs(store, job_id, send)
    return JobExecution(job_id, requeue=send, **options).run()
