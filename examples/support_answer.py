"""Answer a customer's support question with the account's model; fall back when the primary fails.

Set the application up once (the fallback is tried when the primary answers
429/5xx or times out):

    PUT /api/v1/applications/support
    {"intents": {"answer": {"model": "gpt-4o-mini", "base_url": "https://api.openai.com/v1",
                            "api_key_env": "OPENAI_API_KEY",
                            "fallbacks": [{"model": "llama3.1", "base_url": "http://ollama:11434/v1"}]}}}
"""
from flowpool_workflow import ModelError, WorkflowContext

APPLICATION = "support"
INPUT_SCHEMA = {
    "question": {"type": "string", "description": "The customer's question", "required": True},
    "customer": {"type": "string", "description": "Who is asking, for a friendlier answer"},
}
OUTPUT_SCHEMA = {"answer": {"type": "string"}, "escalate": {"type": "boolean"}}
TIMEOUT_SECONDS = 30

SYSTEM = ("You are a concise, friendly support agent. Answer in at most three sentences. "
          "If you are not sure, say so and offer to hand over to a person.")
ESCALATE_WORDS = ("refund", "lawyer", "cancel my account")


def needs_a_person(question):
    """Questions we always hand over, whatever the model says."""
    return any(word in question.lower() for word in ESCALATE_WORDS)


def execute(ctx: WorkflowContext):
    question = ctx.input["question"]
    customer = ctx.input.get("customer") or "there"
    messages = [{"role": "system", "content": SYSTEM}, *ctx.messages,
                {"role": "user", "content": f"Customer {customer} asks: {question}"}]
    try:
        response = ctx.chat.completions.create(intent="answer", messages=messages, temperature=0.2)
    except ModelError as exc:
        ctx.log.error("no model answered", error=str(exc))
        return {"answer": f"Sorry {customer}, we could not answer right now; a person will get back to you.",
                "escalate": True}
    ctx.emit("progress", "answered")
    return {"answer": response["choices"][0]["message"]["content"], "escalate": needs_a_person(question)}
