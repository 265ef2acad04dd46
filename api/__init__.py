"""The HTTP front door: the app factory, one blueprint per resource, one error renderer."""
from .app import Services, create_app

__all__ = ["Services", "create_app"]
