"""Sign the input with a key the caller sends as a request secret: secrets reach the run, never storage."""
import hashlib
import hmac

from flowpool_workflow import WorkflowContext

INPUT_SCHEMA = {"text": {"type": "string", "description": "What to sign", "required": True}}
OUTPUT_SCHEMA = {"text": {"type": "string"}, "signature": {"type": "string"}}
TIMEOUT_SECONDS = 10
CACHE_TTL_SECONDS = 0  # a signature is cheap to make: run every time (the default caches results for an hour)


def execute(ctx: WorkflowContext):
    key = ctx.secrets.get("signing_key")
    if not key:
        raise ValueError("send the key as a request secret: secrets={'signing_key': '...'}")
    ctx.log.info("signing", length=len(ctx.input["text"]))  # never the key: logs are kept on the run
    signature = hmac.new(key.encode(), ctx.input["text"].encode(), hashlib.sha256).hexdigest()
    return {"text": ctx.input["text"], "signature": signature}
