"""The Celery app and the thin task around :func:`execute_run`."""
from .app import QUEUE, RUN_TASK, create_celery
from .execute import execute_run

__all__ = ["QUEUE", "RUN_TASK", "create_celery", "execute_run"]
