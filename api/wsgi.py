"""The WSGI entry point gunicorn serves: ``gunicorn flowpool.api.wsgi:app``."""
from .app import create_app

app = create_app()
