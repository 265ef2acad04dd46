"""Placeholder blueprint: filled in by the usage routes."""
from __future__ import annotations

from flask import Blueprint

bp = Blueprint("usage", __name__)
