"""`python -m oe_router` runs the daemon, as `oe-routerd` does."""

from oe_router.routerd import main

raise SystemExit(main())
