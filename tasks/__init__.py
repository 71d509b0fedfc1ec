"""Units of work composed by the flows: plan, decode, embed, commit, index, report."""

import os

# Read by Ray when it is imported: without it a local Ray listens on every interface even when
# told to use 127.0.0.1. Set before any task module imports ray; a cluster address ignores it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
