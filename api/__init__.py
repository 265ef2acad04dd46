"""The HTTP front door: the app factory, one blueprint per resource, admission, answers, one error renderer."""
from .app import create_app
from .services import Services

__all__ = ["Services", "create_app"]
