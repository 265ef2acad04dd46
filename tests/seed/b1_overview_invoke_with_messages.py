# Seed snippet B1: https://docs.trymaitai.com/build/workflows/overview, "Invoke a workflow" >
# "With messages (chat-style)". The stored copy ends at `response = maitai.work`. Completed, from the page's prose:
# - `workflow.completions.create(`: the call on `maitai.workflow...` the cut-off line begins;
# - `model="workflow:hs_classification",`: "Set model to workflow:<your-workflow-name>." with the ref name of the
#   seed's upload example (api-reference/workflows/upload-workflow-bundle: "workflow_ref_name": "hs_classification");
# - `messages=[...]`: "An array of chat messages (OpenAI format). Required unless input is provided.";
# - the print line: the structure page says "a JSON-stringified copy becomes choices[0].message.content for
#   OpenAI-shaped consumers".
# Run against flowpool, only the import line changes (to `from flowpool import Maitai`); the key and the base URL
# come from MAITAI_API_KEY and MAITAI_BASE_URL.
from maitai import Maitai

maitai = Maitai()

response = maitai.workflow.completions.create(
    model="workflow:hs_classification",
    messages=[{"role": "user", "content": "Classify: cotton t-shirts"}],
)
print(response.choices[0].message.content)
