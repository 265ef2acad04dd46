"""``python -m flowpool.cli``."""
from . import main

main(prog_name="flowpool")
