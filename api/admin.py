"""Placeholder blueprint: filled in by the admin routes."""
from __future__ import annotations

from flask import Blueprint

bp = Blueprint("admin", __name__)
