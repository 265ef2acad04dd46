# Seed snippet B2: https://docs.trymaitai.com/build/workflows/overview, "Invoke a workflow" > "With session_id (for correlation)".
# The stored copy has this section's prose only, its code not. Written from that prose, in the shape of the same
# page's "With messages (chat-style)" snippet (b1_overview_invoke_with_messages.py: its first lines, verbatim,
# and its completion with `model="workflow:hs_classification"`):
# - `session_id="YOUR_SESSION_ID"`: "Pass session_id to correlate all model calls within a workflow run in Maitai
#   analytics:", with the placeholder every seed SDK page uses for it (sdk/chat, sdk/agent_call, sdk/reasoning).
from maitai import Maitai

maitai = Maitai()

response = maitai.workflow.completions.create(
    model="workflow:hs_classification",
    messages=[{"role": "user", "content": "Classify: cotton t-shirts"}],
    session_id="YOUR_SESSION_ID",
)
print(response.choices[0].message.content)
