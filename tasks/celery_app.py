"""``celery -A flowpool.tasks.celery_app worker|flower``: the app built from the environment."""
from flowpool.settings import Settings

from .app import create_celery

app = create_celery(Settings())
