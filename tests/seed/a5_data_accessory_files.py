# Seed snippet A5: https://docs.trymaitai.com/build/workflows/data, section "Accessory files".
# Completed: the import line (the structure page: "you must import it, or the script fails at runtime with a
# NameError. Upload validation flags a missing import."), and the return line after the page's `...`: the
# structure page says execute "Returns a value ... A bare return or return None is rejected at upload", so the
# elided rest returns what the snippet loaded. The rest is verbatim, its `...` kept.
from maitai_workflow import WorkflowContext
def execute(ctx: WorkflowContext):
    # Loaded once, then cached in-process and in Redis for the worker's lifetime.
    hts_codes = ctx.load_accessory("hts_codes")
    notes = ctx.load_accessory("hts_notes", fallback_path="./hts_notes.json")
    ...
    return {"hts_codes": hts_codes, "notes": notes}
