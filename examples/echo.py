"""Echo the input back, counting words: the smallest useful workflow."""
from flowpool_workflow import WorkflowContext

APPLICATION = "default"  # optional: the application whose models ctx.chat calls use (this one makes none)
INPUT_SCHEMA = {"text": {"type": "string", "description": "What to echo back", "required": True}}
OUTPUT_SCHEMA = {"echo": {"type": "string"}, "words": {"type": "integer"}}
TIMEOUT_SECONDS = 30
CACHE_TTL_SECONDS = 3600  # an hour, the default; a workflow that fetches the latest data sets 0 (caching off)


def execute(ctx: WorkflowContext):
    text = ctx.input["text"]
    ctx.log.info("echoing", length=len(text))
    ctx.emit("progress", "counted words")
    return {"echo": text, "words": len(text.split())}
