"""Accounts and keys, web console sessions, workflows and their versions, applications, agents, names, script
validation, schemas."""
from __future__ import annotations

from typing import TYPE_CHECKING

from flowpool.lazy import lazy_exports

if TYPE_CHECKING:
    from .accounts import Account, Accounts, hash_key
    from .agents import Agent, Agents
    from .applications import Application, Applications, IntentRoute, ProviderKeys, Route
    from .console_sessions import ConsoleSession, ConsoleSessions
    from .schema import check_input, check_invocation_input, check_output
    from .validation import Problem, ScriptInfo, Validation, validate_script
    from .workflows import ResolvedWorkflow, Upload, Workflows, bump_version


# The module of each public name. Imported on first use: the stores need redis (the
# server extra), while `flowpool validate` imports .validation on a client-only install.
_MODULES = {
    "Account": "accounts", "Accounts": "accounts", "hash_key": "accounts",
    "Agent": "agents", "Agents": "agents",
    "Application": "applications", "Applications": "applications",
    "IntentRoute": "applications", "ProviderKeys": "applications", "Route": "applications",
    "ConsoleSession": "console_sessions", "ConsoleSessions": "console_sessions",
    "check_input": "schema", "check_invocation_input": "schema", "check_output": "schema",
    "Problem": "validation", "ScriptInfo": "validation", "Validation": "validation", "validate_script": "validation",
    "Workflows": "workflows", "ResolvedWorkflow": "workflows", "Upload": "workflows", "bump_version": "workflows",
}

__all__ = sorted(_MODULES)
__getattr__ = lazy_exports(__name__, _MODULES)
