# Seed snippet A6: https://docs.trymaitai.com/api-reference/workflows/validate-workflow-script, the cURL
# example's "code" field (a JSON string), decoded. Verbatim; nothing completed.
def execute(ctx):
    return {'ok': True}
