"""The Celery task that runs one LR-finder job."""

from __future__ import annotations

import logging
from typing import Any

from lrfinder.delivery import RUN_JOB_TASK
from lrfinder.errors import StudyError
from lrfinder.settings import get_settings
from worker import presence
from worker.app import app
from worker.execution import JobExecution

logger = logging.getLogger(__name__)


@app.task(name=RUN_JOB_TASK, bind=True, ignore_result=True)
def run_job(self: Any, job_id: str) -> str:
    """Run the job ``job_id`` unless another execution has it or it is finished."""
    # Imported here so that loading the task module costs no torch import.
    from lrfinder.study import run_study

    delivery = self.request.delivery_info or {}
    queue = delivery.get("routing_key") or get_settings().queue
    if delivery.get("redelivered"):
        logger.warning("job %s: message delivered again", job_id)

    def requeue(requeued_id: str) -> None:
        app.send_task(RUN_JOB_TASK, args=[requeued_id], queue=queue)

    execution = JobExecution(
        job_id,
        store=presence.get_store(),
        settings=get_settings(),
        shutdown=presence.SHUTDOWN,
        requeue=requeue,
        run_study=run_study,
        study_error=StudyError,
    )
    return execution.run()
