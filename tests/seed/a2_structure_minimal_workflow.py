# Seed snippet A2: https://docs.trymaitai.com/build/workflows/structure.md, top of page,
# "Here is a complete, minimal workflow:". Verbatim; nothing completed.
from maitai_workflow import WorkflowContext

APPLICATION = "My Application"

INPUT_SCHEMA = {
    "query": {"type": "string", "description": "The user's question", "required": True},
    "context": {"type": "string", "description": "Optional background context"},
}

OUTPUT_SCHEMA = {
    "answer": {"type": "string", "description": "The generated answer"},
    "confidence": {"type": "number", "description": "Confidence between 0 and 1"},
}


def execute(ctx: WorkflowContext):
    inp = ctx.input or {}
    query = inp.get("query", "")
    if not query:
        return {"error": "query is required"}

    resp = ctx.chat.completions.create(
        messages=[{"role": "user", "content": query}],
        application=APPLICATION,
        intent="answer_query",
    )
    answer = resp["choices"][0]["message"]["content"]

    return {"answer": answer, "confidence": 0.85}
