"""The keyword arguments the seed's (Maitai's) docs give as Maitai's own on a model or agent call: flowpool takes them.

A script written for Maitai passes them to ``ctx.chat.completions.create`` or
``ctx.agents.create``; sent on, a strict provider answers 400 to a field it
does not know. The worker takes them out of the call's parameters before the
request body is built (a script may reach the worker without
:mod:`flowpool_workflow`, so the sandbox side cannot be relied on):

- ``session_id`` becomes the call's session: its ``X-Flowpool-Session-Id``
  header and its record's ``session_id``;
- ``reasoning={"effort": ..., "summary": ...}`` becomes the OpenAI chat
  parameter ``reasoning_effort`` (unless the call gives that itself);
  ``summary`` is taken;
- the rest are taken and named (never their values) in the call record's
  ``taken_params``.

Every other keyword (temperature, tools, response_format...) is forwarded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAITAI_KWARGS", "TakenParams", "take_maitai_params"]

# Each name with where the seed documents it (docs.trymaitai.ai/sdk/chat in both its versions, "Maitai parameters"
# and "Maitai Specific Parameters"; docs.trymaitai.com/sdk/reasoning; docs.trymaitai.com/sdk/agent_call and
# api-reference/agents/invoke-agent).
MAITAI_KWARGS: frozenset[str] = frozenset({
    "session_id",  # sdk/chat: "Groups related requests into a session in the Portal."
    "metadata",  # sdk/chat: "Optional metadata tags stored with the request for filtering/debugging."
    "evaluation_enabled",  # sdk/chat: "Enable/disable Sentinel evaluations for this request"
    "apply_corrections",  # sdk/chat: "Maitai may apply an automatic correction if evaluations find a fault."
    "safe_mode",  # sdk/chat: "Prioritize accuracy over latency when applying corrections."
    "callback",  # sdk/chat: "Optional callback invoked with the evaluation results."
    "server_side_inference",  # sdk/chat: "Controls where inference runs."
    "fallback_config",  # sdk/chat: "Optional fallback configuration used when the primary model fails or times out."
    "reference_id",  # sdk/chat (older): "A reference identifier for identifying the request in your session."
    "assistant",  # sdk/chat (older): "Whether to run as an Assistant."
    "user_id",  # sdk/chat (older): "Unique identifier for a user, used for long term memory."
    "context_retrieval_enabled",  # sdk/chat (older): "whether or not to retrieve and inject applicable context parts"
    "context_query",  # sdk/chat (older): "A query used for retrieving applicable context."
    "fallback_model",  # sdk/chat (older): "Model to be used if primary model fails or is experiencing an outage."
    "reasoning",  # sdk/reasoning: "Pass reasoning inside the same argument list as your chat completion"
    "execution_mode",  # sdk/agent_call extra_body: "auto" (default), "reasoning", or "route"
    "high_performance",  # sdk/agent_call extra_body: "flatten sub-agents, run in-process"
    "max_iterations",  # agents/invoke-agent: "Maximum number of orchestration iterations before the agent stops."
})


_MAX_SESSION_ID = 200  # it travels in a header; the bound of the run's own (api/models.py InvokeRequest)


@dataclass
class TakenParams:
    """What a call's parameters were left with for the provider, and what flowpool took from them."""

    body: dict[str, Any]  # the parameters forwarded in the request body
    session_id: str | None = None  # the call's own session, when it gave one
    taken: list[str] = field(default_factory=list)  # the names taken, sorted (never their values)


def take_maitai_params(params: dict[str, Any], session_id: Any = None) -> TakenParams:
    """Split a call's keyword parameters into what is forwarded and what flowpool takes.

    ``session_id`` is one given beside the parameters (flowpool_workflow sends
    it so); one among them counts as well. A value of None is neither
    forwarded nor taken, as an omitted keyword. A session id that is not a
    short line of text is a ValueError: it travels in a header.
    """
    body = {k: v for k, v in params.items() if v is not None and k not in MAITAI_KWARGS}
    taken = sorted(k for k, v in params.items() if v is not None and k in MAITAI_KWARGS and k != "session_id")
    session = session_id if session_id is not None else params.get("session_id")
    reasoning = params.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None and "reasoning_effort" not in body:
        body["reasoning_effort"] = reasoning["effort"]  # OpenAI's chat name for it
    if session is not None and (not isinstance(session, (str, int)) or isinstance(session, bool)):
        raise ValueError(f"session_id is a string, got {type(session).__name__}")
    session = None if session in (None, "") else str(session)
    if session is not None and (len(session) > _MAX_SESSION_ID or not session.isprintable()):
        raise ValueError(f"session_id is at most {_MAX_SESSION_ID} printable characters")
    return TakenParams(body=body, session_id=session, taken=taken)
