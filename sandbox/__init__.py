"""Isolation of workflow runs: the zygote, the run process runtime and the worker-side supervisor."""
from .supervisor import RunOutcome, Sandbox, SandboxLimits, Zygote

__all__ = ["RunOutcome", "Sandbox", "SandboxLimits", "Zygote"]
