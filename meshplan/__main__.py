"""``python -m meshplan``: the command line."""

from .cli import main

raise SystemExit(main())
