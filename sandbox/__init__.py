"""Isolation of workflow runs: the zygote, the run process runtime and the worker-side supervisor."""
from .supervisor import CallFailed, CallHandler, RunOutcome, Sandbox, SandboxLimits, Streamed, Zygote

__all__ = ["CallFailed", "CallHandler", "RunOutcome", "Sandbox", "SandboxLimits", "Streamed", "Zygote"]
