# Seed snippet B2: https://docs.trymaitai.com/build/workflows/overview, "Invoke a workflow" > "Streaming responses".
# The stored copy has this section's prose only, its code not. Written from that prose, in the shape of the same
# page's "With messages (chat-style)" snippet (b1_overview_invoke_with_messages.py: its first lines, verbatim,
# and its completion with `model="workflow:hs_classification"`):
# - `stream=True` and the loop: "set stream=True. The workflow will yield intermediate chunks as they are emitted
#   (via ctx.emit()), followed by the final completion."
from maitai import Maitai

maitai = Maitai()

stream = maitai.workflow.completions.create(
    model="workflow:hs_classification",
    messages=[{"role": "user", "content": "Classify: cotton t-shirts"}],
    stream=True,
)
for chunk in stream:
    print(chunk)
