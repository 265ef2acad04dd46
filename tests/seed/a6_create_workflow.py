# Seed snippet A6: https://docs.trymaitai.com/api-reference/workflows/create-workflow, the cURL example's
# "script" field, decoded. Verbatim. It has no execute: the seed's structure page says "There must be precisely
# one module-level def execute(...). Upload validation rejects a script with zero or multiple.", and flowpool
# rejects it so too (tests/integration/test_seed_snippets.py checks the 400).
def run(input): return input
