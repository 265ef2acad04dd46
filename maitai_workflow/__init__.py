"""Alias of :mod:`flowpool_workflow`, so scripts written for maitai run unchanged."""
from flowpool_workflow import *  # noqa: F401,F403
from flowpool_workflow import __all__  # noqa: F401
