# Seed snippet B2: https://docs.trymaitai.com/build/workflows/overview, "Invoke a workflow" > "With input (structured payload)".
# The stored copy has this section's prose only, its code not. Written from that prose, in the shape of the same
# page's "With messages (chat-style)" snippet (b1_overview_invoke_with_messages.py: its first lines, verbatim,
# and its completion with `model="workflow:hs_classification"`):
# - `input={...}`: "For workflows that expect structured data rather than chat messages, use input:" and
#   "Arbitrary JSON payload passed to the workflow";
# - the print line: the structure page says "The returned object is exposed verbatim as response.output".
from maitai import Maitai

maitai = Maitai()

response = maitai.workflow.completions.create(
    model="workflow:hs_classification",
    input={"query": "cotton t-shirts"},
)
print(response.output)
