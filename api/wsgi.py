"""The WSGI entry point gunicorn serves: ``gunicorn flowpool.api.wsgi:app``.

Imported in each gunicorn worker (or, with ``--preload``, in the arbiter before
it forks), so gunicorn's own errors come back as JSON here too, as under
``flowpool api``.
"""
from .app import create_app
from .serving import use_json_error_pages

use_json_error_pages()
app = create_app()
