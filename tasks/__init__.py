"""The Celery side: the app and names an API process sends runs with, and what a worker runs them with.

Importing this package loads only :mod:`.app` (Celery's configuration): the
worker side (:mod:`.run_task`, :mod:`.execute`, the sandbox and model calls)
loads on first use of its names, so an API process never imports it.
"""
from __future__ import annotations

from typing import Any

from .app import QUEUE, RUN_TASK, create_celery

__all__ = ["QUEUE", "RUN_TASK", "create_celery", "execute_run", "worker_celery"]


def __getattr__(name: str) -> Any:
    if name == "worker_celery":
        from .run_task import worker_celery
        return worker_celery
    if name == "execute_run":
        from .execute import execute_run
        return execute_run
    raise AttributeError(name)
