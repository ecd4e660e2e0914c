"""``python -m fascore.compat SCRIPT.py [ARGS...]``: run a script with the torch_npu stand-in."""
from . import main

raise SystemExit(main())
