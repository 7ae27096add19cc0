"""The key vault's Alembic environment: the data database's, run on the vault's URL."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).parent.parent / "migrations" / "env.py"))
