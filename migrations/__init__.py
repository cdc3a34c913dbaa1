"""Alembic migrations of the memory database, configured in code (no alembic.ini needed)."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from sqlalchemy.engine import URL

MIGRATIONS_DIR = Path(__file__).resolve().parent


def alembic_config(database_url: str | URL) -> Config:
    """Return an Alembic config whose env.py migrates database_url."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not a main option: ConfigParser would mangle a '%' in a password.
    config.attributes["database_url"] = database_url
    return config
