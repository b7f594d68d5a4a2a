"""Topiq's entry point: `python main.py --help` lists every command."""

import importlib.util
import sys

# Run with a Python that lacks Topiq's dependencies (not the project's virtualenv): say so.
_missing = [
    m for m in ("pydantic_settings", "rich", "sqlalchemy") if not importlib.util.find_spec(m)
]
if _missing:
    sys.exit(
        f"topiq: {sys.executable} lacks Topiq's dependencies ({', '.join(_missing)}); run "
        "`scripts/setup`, then `.venv/bin/python main.py ...` (or `source .venv/bin/activate`)"
    )

from core.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
