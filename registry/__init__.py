"""Accounts and keys, workflows and their versions, applications, agents, names, script validation, schemas."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .accounts import Account, Accounts, hash_key
    from .agents import Agent, Agents
    from .applications import Application, Applications, IntentRoute, Route
    from .schema import check_input, check_invocation_input, check_output
    from .validation import Problem, ScriptInfo, Validation, validate_script
    from .workflows import ResolvedWorkflow, Upload, Workflows, bump_version

__all__ = [
    "Account", "Accounts", "Agent", "Agents", "Application", "Applications", "IntentRoute", "Problem",
    "ResolvedWorkflow", "Route", "ScriptInfo", "Upload", "Validation", "Workflows",
    "bump_version", "check_input", "check_invocation_input", "check_output", "hash_key", "validate_script",
]

# The module of each public name. Imported on first use: the stores need redis (the
# server extra), while `flowpool validate` imports .validation on a client-only install.
_MODULES = {
    "Account": "accounts", "Accounts": "accounts", "hash_key": "accounts",
    "Agent": "agents", "Agents": "agents",
    "Application": "applications", "Applications": "applications",
    "IntentRoute": "applications", "Route": "applications",
    "check_input": "schema", "check_invocation_input": "schema", "check_output": "schema",
    "Problem": "validation", "ScriptInfo": "validation", "Validation": "validation", "validate_script": "validation",
    "Workflows": "workflows", "ResolvedWorkflow": "workflows", "Upload": "workflows", "bump_version": "workflows",
}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use."""
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value
