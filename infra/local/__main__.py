"""`python -m infra.local up|down|status` (what `make cluster-up` / `make cluster-down` run)."""
import sys

from infra.local.cluster import main

sys.exit(main())
