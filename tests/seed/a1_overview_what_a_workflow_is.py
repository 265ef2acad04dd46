# Seed snippet A1: https://docs.trymaitai.com/build/workflows/overview.md, section "What a workflow is".
# Verbatim; nothing completed.
from maitai_workflow import WorkflowContext

def execute(ctx: WorkflowContext):
    resp = ctx.chat.completions.create(
        messages=[{"role": "user", "content": ctx.input["query"]}],
        application="Support", intent="answer",
    )
    return {"answer": resp["choices"][0]["message"]["content"]}
