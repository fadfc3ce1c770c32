"""``python -m meshplan``: the command line."""

from .cli.main import main

raise SystemExit(main())
