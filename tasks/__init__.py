"""The Celery side: the app and names an API process sends runs with, and what a worker runs them with.

Importing this package loads only :mod:`.app` (Celery's configuration): the
worker side (:mod:`.run_task`, :mod:`.execute`, the sandbox and model calls)
loads on first use of its names, so an API process never imports it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from flowpool.lazy import lazy_exports

from .app import QUEUE, RUN_TASK, create_celery

if TYPE_CHECKING:
    from .execute import execute_run
    from .run_task import worker_celery

__all__ = ["QUEUE", "RUN_TASK", "create_celery", "execute_run", "worker_celery"]

__getattr__ = lazy_exports(__name__, {"execute_run": "execute", "worker_celery": "run_task"})
