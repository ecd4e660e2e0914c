"""``python -m fascore``: the ``fascore`` command line (check, bench, demo, run, info, compare)."""
from fascore.tools.cli import main

if __name__ == "__main__":
    main()
