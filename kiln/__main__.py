"""``python -m kiln``: the same as the ``kiln`` command."""
from .cli import main

raise SystemExit(main())
