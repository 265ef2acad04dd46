# Seed snippet A3: https://docs.trymaitai.com/build/workflows/context.md, top of page.
# Completed: line 1 below this header (the import). The page shows the function alone; the structure page
# (https://docs.trymaitai.com/build/workflows/structure.md) says of WorkflowContext used as the type hint on
# execute(ctx: WorkflowContext): "you must import it, or the script fails at runtime with a NameError. Upload
# validation flags a missing import." The import is the one of that page's own example (A2). The rest is verbatim.
from maitai_workflow import WorkflowContext
def execute(ctx: WorkflowContext):
    query = ctx.input["query"]
    resp = ctx.chat.completions.create(
        messages=[{"role": "user", "content": query}],
        application="Support", intent="answer",
    )
    return {"answer": resp["choices"][0]["message"]["content"]}
