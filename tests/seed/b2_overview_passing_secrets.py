# Seed snippet B2: https://docs.trymaitai.com/build/workflows/overview, "Invoke a workflow" > "Passing secrets".
# The stored copy has this section's prose only, its code not. Written from that prose, in the shape of the same
# page's "With messages (chat-style)" snippet (b1_overview_invoke_with_messages.py: its first lines, verbatim,
# and its completion with `model="workflow:hs_classification"`):
# - `secrets={...}`: "If your workflow requires runtime credentials (e.g. third-party API keys), pass them via
#   secrets. These are never stored — they're only available for the duration of the request."
from maitai import Maitai

maitai = Maitai()

response = maitai.workflow.completions.create(
    model="workflow:hs_classification",
    messages=[{"role": "user", "content": "Classify: cotton t-shirts"}],
    secrets={"THIRD_PARTY_API_KEY": "YOUR_THIRD_PARTY_API_KEY"},
)
print(response.choices[0].message.content)
