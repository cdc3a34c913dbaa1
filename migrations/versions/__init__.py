"""Alembic revision scripts of the memory database."""
