"""Accounts and keys, workflow scripts, versions and their validation."""
from .accounts import Account, Accounts, hash_key
from .agents import Agent, Agents
from .applications import Application, Applications, IntentRoute, Route
from .schema import check_input, check_output
from .validation import Problem, ScriptInfo, Validation, validate_script
from .workflows import Registry, ResolvedWorkflow, Upload, bump_version

__all__ = [
    "Account", "Accounts", "Agent", "Agents", "Application", "Applications", "IntentRoute", "Problem", "Route", "Registry", "ResolvedWorkflow", "ScriptInfo", "Upload", "Validation",
    "bump_version", "check_input", "check_output", "hash_key", "validate_script",
]
