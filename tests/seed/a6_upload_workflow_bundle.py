# Seed snippet A6: https://docs.trymaitai.com/api-reference/workflows/upload-workflow-bundle, the cURL
# example's "script" field (a JSON string), decoded. Verbatim; nothing completed.
def execute(ctx):
    return {'ok': True}
