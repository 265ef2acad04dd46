"""The ctx calls of one run, served by its worker thread: models, agents, HTTP, and workflows called inline.

A workflow called with ``ctx.workflows.call`` runs in a sandboxed process of
its own, on the caller's thread and under the caller's remaining budget: it
takes no queue slot, so a full pool cannot deadlock on nested calls. Depth is
limited and a workflow already on the call chain cannot be called again.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from flowpool.errors import DatastoreCatchingUp, FlowpoolError, NotFound, TimeLimitExceeded
from flowpool.registry import Agents, Workflows, check_invocation_input, check_output
from flowpool.sandbox import CallErrorKind, CallFailed

from .accessories import AccessoryAllowance
from .model_calls import RunCalls
from .outbound import HttpCalls

if TYPE_CHECKING:
    from .worker import WorkerRuntime

__all__ = ["CallRouter"]


@dataclass
class CallRouter:
    """Serves ``on_call`` for one run; workflows it calls inline get a router of their own."""

    runtime: WorkerRuntime
    calls: RunCalls  # and, in calls.job, the job this router serves
    chain: list[str]
    on_emit: Callable[[str, Any], None] | None = None
    workflow_calls: list[dict[str, Any]] = field(default_factory=list)  # a nested router shares the run's list
    http_calls: HttpCalls = field(default_factory=HttpCalls)  # and these
    on_idle: Callable[[], None] | None = None
    @functools.cached_property
    def accessories_left(self) -> AccessoryAllowance:
        """The accessory bytes this run may still be handed: its memory limit (a nested run, served by a router
        of its own, gets its own). Made on the first accessory call: most runs load none."""
        return AccessoryAllowance(self.runtime.limits_for(self.calls.job.limits).memory_bytes)

    def __call__(self, method: str, params: dict[str, Any], deadline: float) -> Any:
        if method in ("chat", "chat.stream"):
            return self.runtime.models.chat(self.calls, params, deadline, stream=method == "chat.stream")
        if method == "http":
            return self.runtime.http.request(params, deadline, record=self._record_http)
        if method == "workflows.call":
            return self.call_workflow(params.get("ref_name"), params.get("input"), params.get("messages"), deadline)
        if method == "agents.create":
            return self.call_agent(params, deadline)
        if method == "accessory":  # the job's own version's, a nested call's included: its file, by descriptor
            return self.runtime.accessories.open(self.calls.job, params.get("key"), deadline, self.accessories_left)
        if method in ("datastore.get", "datastore.search"):
            return self.call_datastore(method, params, deadline)
        raise CallFailed(CallErrorKind.UNSUPPORTED, f"this worker does not serve ctx call {method!r}")

    def call_workflow(self, ref: Any, input: Any, messages: Any, deadline: float) -> Any:
        """Run workflow ``ref`` of the same account inline and return its output."""
        settings = self.runtime.settings
        if not isinstance(ref, str) or not ref:
            raise CallFailed(CallErrorKind.WORKFLOW, "ctx.workflows.call needs a workflow ref name")
        if ref in self.chain:
            raise CallFailed(CallErrorKind.WORKFLOW, "call cycle: " + " -> ".join([*self.chain, ref]))
        if len(self.chain) > settings.max_call_depth:
            raise CallFailed(CallErrorKind.WORKFLOW, f"workflows may call each other at most "
                             f"{settings.max_call_depth} deep: " + " -> ".join([*self.chain, ref]))
        account = self.calls.job.account
        try:
            workflow = Workflows(self.runtime.redis).resolve(account, ref)
            check_invocation_input(workflow.input_schema, input)
            script = self.runtime.scripts.get(account, ref, workflow.version, workflow.content_hash)
        except FlowpoolError as exc:
            raise CallFailed(CallErrorKind.WORKFLOW, f"cannot call workflow {ref!r}: {exc.message}") from exc
        remaining = deadline - time.monotonic()
        if remaining <= 0.05:
            raise CallFailed(CallErrorKind.WORKFLOW, "the run's time budget is spent")
        soft = min(settings.clamp_timeout(workflow.timeout_seconds), remaining)
        job = self.calls.job.child(workflow, soft, input, messages)
        nested = replace(self, calls=self.calls.child(job), chain=[*self.chain, ref])
        started_at, started = time.time(), time.monotonic()
        shown = {"workflow": ref, "version": workflow.version, "caller": self.chain[-1], "depth": len(self.chain),
                 "error": None, "started_at": started_at, "latency_ms": None}
        self.calls.started("workflow", shown)
        try:
            outcome = self.runtime.sandbox.run(script.code, job.sandbox_view(), soft, on_emit=self.on_emit,
                                               source=script.source,
                                               on_call=nested, slot_timeout=max(0.05, remaining - soft / 2),
                                               on_idle=self.on_idle, limits=self.runtime.limits_for(workflow.limits))
        except BaseException:  # the worker's own failure: the record keeps no entry of this call
            self.calls.dropped(shown)
            raise
        error = outcome.error
        if error is None:
            try:
                check_output(workflow.output_schema, outcome.result, self.runtime.settings.max_json_depth,
                             outcome.result_json)
            except FlowpoolError as exc:
                error = exc  # type: ignore[assignment]
        entry = {
            "workflow": ref, "version": workflow.version, "caller": self.chain[-1], "depth": len(self.chain),
            "status": "ok" if error is None else "error", "error": error.message if error else None,
            "started_at": started_at, "latency_ms": round((time.monotonic() - started) * 1000, 3), "logs": outcome.logs,
        }
        self.workflow_calls.append(entry)
        self.calls.ended("workflow", entry, started=shown)
        if error is not None:
            if isinstance(error, TimeLimitExceeded) and soft >= remaining:
                # The caller's own budget bounded the callee: let the caller's
                # soft limit, a moment away, end it as a 408 of its own.
                time.sleep(max(0.0, deadline - time.monotonic()) + 0.2)
            raise CallFailed(CallErrorKind.WORKFLOW, f"workflow {ref}@{workflow.version} failed: {error.message}")
        return outcome.result

    def _record_http(self, entry: dict[str, Any]) -> None:
        """Keep an HTTP call's entry on the run's record, under the workflow this router serves, and publish it."""
        self.http_calls.add(entry, self.calls.job.workflow)
        self.calls.ended("http", {**entry, "workflow": self.calls.job.workflow})

    def call_datastore(self, method: str, params: dict[str, Any], deadline: float | None = None) -> Any:
        """Read a datastore of the run's account: a record by id (or None), or a search's ranked records.

        Bringing the worker's replica up to date (a cold host, a large ingest) stops at the run's ``deadline``,
        at the latest once the batch being applied then is in (the session cannot end a run while a call is
        served), and the script sees its soft limit, as when an accessory's fetch runs out of time.
        """
        store = params.get("store")
        if not isinstance(store, str) or not store:
            raise CallFailed(CallErrorKind.DATASTORE, f"ctx.datastore needs a store name, got {store!r}")
        account = self.calls.job.account
        try:
            if method == "datastore.get":
                record_id = params.get("id")
                if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
                    raise CallFailed(CallErrorKind.DATASTORE, f"a record id is a string or an integer, got "
                                     f"{record_id!r}")
                return self.runtime.datastores.get_record(account, store, str(record_id), deadline=deadline)
            query, vector, filters = params.get("query"), params.get("vector"), params.get("filters")
            if not (query is None or isinstance(query, str)) or not (filters is None or isinstance(filters, dict)) \
                    or not (vector is None or isinstance(vector, list)):
                raise CallFailed(CallErrorKind.DATASTORE, "query is a string, vector a list of numbers, filters a "
                                 "dict of field values")
            return self.runtime.datastores.search(account, store, query=query, vector=vector,
                                                  limit=params.get("limit", 10), filters=filters,
                                                  deadline=deadline)["data"]
        except DatastoreCatchingUp as exc:  # the run's time ran out first: a timeout, not a fault of the store
            raise CallFailed(CallErrorKind.TIMEOUT, exc.message) from exc
        except FlowpoolError as exc:  # no such store (another account's included), a bad query, a failed embedding
            raise CallFailed(CallErrorKind.DATASTORE, f"datastore {store!r}: {exc.message}") from exc

    def call_agent(self, params: dict[str, Any], deadline: float) -> dict[str, Any]:
        """Call a configured agent: an endpoint, or a workflow answering in the chat.completion shape."""
        name = params.get("agent")
        if not isinstance(name, str):
            raise CallFailed(CallErrorKind.MODEL, "ctx.agents.create needs an agent name")
        try:
            agent = Agents(self.runtime.redis).get(self.calls.job.account, name)
        except NotFound as exc:
            raise CallFailed(CallErrorKind.MODEL, exc.message) from exc
        messages = params.get("messages")
        if messages is None:
            messages = self.calls.job.messages
        if agent.workflow is None:
            return self.runtime.models.agent(self.calls, name, agent, messages, params.get("params") or {}, deadline,
                                             session_id=params.get("session_id"))
        output = self.call_workflow(agent.workflow, None, messages, deadline)
        content = output if isinstance(output, str) else json.dumps(output)
        return {"object": "chat.completion", "model": f"workflow:{agent.workflow}", "output": output,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}]}
