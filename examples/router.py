"""Route a request to the workflow that handles it: documents to the pipeline, the rest to support.

Calls "document-pipeline" and "support-answer" inline (ctx.workflows.call):
they run under this run's time budget, without taking another queue slot.
"""
from flowpool_workflow import WorkflowCallError, WorkflowContext

INPUT_SCHEMA = {"text": {"type": "string", "description": "A question, or a URL to summarize", "required": True}}
OUTPUT_SCHEMA = {"route": {"type": "string"}, "result": {"type": "object"}}
TIMEOUT_SECONDS = 150


def choose(text):
    return "document-pipeline" if text.strip().startswith(("http://", "https://")) else "support-answer"


def execute(ctx: WorkflowContext):
    text = ctx.input["text"]
    route = choose(text)
    ctx.emit("route", route)
    payload = {"url": text.strip()} if route == "document-pipeline" else {"question": text}
    try:
        result = ctx.workflows.call(route, input=payload)
    except WorkflowCallError as exc:
        ctx.log.error("the routed workflow failed", route=route, error=str(exc))
        result = {"error": str(exc)}
    return {"route": route, "result": result}
