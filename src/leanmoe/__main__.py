"""``python -m leanmoe bench | verify | info``: the same as the ``leanmoe`` console script."""

from leanmoe.cli import main

raise SystemExit(main())
