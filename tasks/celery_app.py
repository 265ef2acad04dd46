"""``celery -A flowpool.tasks.celery_app worker|flower``: the worker's app built from the environment."""
from flowpool.settings import Settings

from .run_task import worker_celery

app = worker_celery(Settings())
