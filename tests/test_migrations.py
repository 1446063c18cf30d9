"""An empty database migrated to head has exactly the ORM's schema (SQLite and PostgreSQL)."""

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from registry.db import current_revision, head_revision, make_engine, upgrade
from registry.schema import Base


def test_empty_database_migrates_to_the_orm_schema(database_url):
    engine = make_engine(database_url)
    assert current_revision(engine) is None
    upgrade(engine, database_url)
    assert current_revision(engine) == head_revision(database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    engine.dispose()


def test_registry_open_migrates_on_first_use(database_url):
    from registry.store import Registry

    registry = Registry.open()
    assert current_revision(registry.engine) == head_revision(database_url)
    registry.close()
