"""Agents: ``PUT|GET /api/v1/agents/{name}`` and the list."""
from __future__ import annotations

from flask import Blueprint, jsonify

from flowpool.registry import Agent

from .applications import check_name
from .parsing import json_body, model_from, page_args, paginated
from .services import authenticate, services

bp = Blueprint("agents", __name__, url_prefix="/api/v1/agents")


@bp.put("/<name>")
def put_agent(name: str):  # type: ignore[no-untyped-def]
    svc, account = services(), authenticate()
    agent = model_from(Agent, json_body())
    svc.provider_keys.check(agent.key_envs())
    created = svc.agents.put(account.id, check_name(name), agent)
    return jsonify({"data": {"name": name, **agent.model_dump(exclude_none=True)}}), 201 if created else 200


@bp.get("/<name>")
def get_agent(name: str):  # type: ignore[no-untyped-def]
    svc, account = services(), authenticate()
    agent = svc.agents.get(account.id, check_name(name))
    return jsonify({"data": {"name": name, **agent.model_dump(exclude_none=True)}})


@bp.get("")
def list_agents():  # type: ignore[no-untyped-def]
    svc, account = services(), authenticate()
    offset, limit = page_args()
    items, total = svc.agents.list(account.id, offset, limit)
    return jsonify(paginated(items, total, offset, limit))
