"""Delivery settings that the API's Celery client and the workers share.

Both sides build their own Celery app (the API must not import the worker
package), so the values that must agree are computed here. This module
imports neither Celery nor torch.
"""

from __future__ import annotations

from lrfinder.settings import Settings

RUN_JOB_TASK = "lrfinder.run_job"
# Seconds an unacknowledged message may wait beyond the longest job before
# the broker delivers it again. The job's lock and status make a second
# delivery harmless, but it would still cost a message and a log line.
VISIBILITY_MARGIN_S = 3600


def visibility_timeout_s(settings: Settings) -> int:
    """Return the Redis broker's visibility timeout for ``settings``, seconds.

    A worker acknowledges a job's message only when the job ends (late
    acknowledgement), and a job runs at most ``settings.max_time_limit_s``
    from its first start, so the timeout exceeds that by a margin.
    """
    return int(settings.max_time_limit_s) + VISIBILITY_MARGIN_S
