"""Alembic migrations for the registry schema; ``registry.db.upgrade`` applies them."""
