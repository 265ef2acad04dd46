"""The baseline: a bare Celery app with one no-op task, on the benchmark's Redis."""
import os

from celery import Celery

_url = os.environ["BENCH_REDIS_URL"]
app = Celery("bare", broker=_url, backend=_url.rsplit("/", 1)[0] + "/1")
app.conf.update(task_serializer="json", accept_content=["json"], worker_prefetch_multiplier=1,
                task_default_queue="bare", broker_connection_retry_on_startup=True)


@app.task(name="bare.noop")
def noop() -> None:
    return None
