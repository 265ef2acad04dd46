# Seed snippet A4: https://docs.trymaitai.com/build/workflows/context, section "Call a model".
# The stored copy ends inside the user message ("Summarize Q3 earnin"). Completed, from the same page:
# - the import line and the `def execute(ctx: WorkflowContext):` line, as in the page's top example (A3) and the
#   structure page's rule that the import is required; the verbatim lines are indented under it by 4 spaces;
# - "gs." closing the user message, and the lines closing the list and the call;
# - `application="Support", intent="answer",`: the page's top example's, since the section's prose says the call
#   is routed by "The intent name" and "The application this call belongs to";
# - the return line, as in the page's top example: "The non-streaming call returns an OpenAI-s[hape]..." dict.
from maitai_workflow import WorkflowContext

def execute(ctx: WorkflowContext):
    resp = ctx.chat.completions.create(
        messages=[
            {"role": "system", "content": "You are a financial analyst."},
            {"role": "user", "content": "Summarize Q3 earnings."},
        ],
        application="Support", intent="answer",
    )
    return {"answer": resp["choices"][0]["message"]["content"]}
