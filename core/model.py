"""The ORM base for the application's models, on the queue database.

    from core.model import Model

    session = await Model.get_session()
    result = await session.execute(select(QueueFailedJob).where(QueueFailedJob.queue == "emails"))

`Model` shares its metadata with the queue tables (`core.queue.drivers.sql_tables`), so a model
can map one of them with `__table__`. `get_session()` opens sessions on the database of the
default settings (`DB_URL`, or `DB_*` with `ENABLE_MYSQL`, or the SQLite file), on one engine
per event loop, creating the queue tables first when `DB_AUTO_MIGRATE` is on. The caller owns
each session and should close it (`async with await Model.get_session() as session:`); any
still open when the event loop shuts down are closed with the engine.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase

from core.queue.drivers import sql_tables
from core.queue.drivers.sql_migrations import create_engine, migrate

__all__ = ["Model"]


@dataclass(eq=False)
class _LoopEngine:
    """The engine of one event loop, its session factory and the sessions it handed out."""

    engine: AsyncEngine
    factory: async_sessionmaker[AsyncSession]
    auto_migrate: bool
    ready: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Strong references: a session dropped while it holds a connection (the seed's example
    # never closes its session) cannot give it back without the loop, so it must live on
    # until `_close_with_loop`. Sessions holding no connection are let go.
    sessions: set[AsyncSession] = field(default_factory=set)
    closer: AsyncIterator[None] | None = None


# Engines hold connections made on their loop, unusable from any other: one engine per loop.
_engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopEngine] = (
    weakref.WeakKeyDictionary()
)


async def _close_with_loop(bound: _LoopEngine) -> AsyncIterator[None]:
    # asyncio.run() finalises async generators before it closes its loop: this `finally` then
    # closes the sessions left open and the engine's connections, on the loop that owns them.
    try:
        yield
    finally:
        for session in list(bound.sessions):
            await session.close()
        await bound.engine.dispose()


class Model(DeclarativeBase):
    """Base class of the application's models (SQLAlchemy 2 declarative)."""

    metadata = sql_tables.metadata

    @classmethod
    async def get_session(cls) -> AsyncSession:
        """A new session on the default database; the caller closes it.

        Raises:
            ConfigurationError: the database settings are unusable.
            DriverError: the tables could not be created (`ConnectionLostError` when the
                server does not answer).
        """
        loop = asyncio.get_running_loop()
        bound = _engines.get(loop)
        if bound is None:
            # Imported here: the queue manager imports the job machinery, not needed by models
            # until a session is asked for.
            from core.queue.queue_manager import get_default_manager

            settings = get_default_manager().settings
            engine = create_engine(settings.database_dsn, pool_size=settings.db_pool_size)
            factory = async_sessionmaker(engine, expire_on_commit=False)
            bound = _engines[loop] = _LoopEngine(engine, factory, settings.db_auto_migrate)
            bound.closer = _close_with_loop(bound)
            await anext(bound.closer)
        if not bound.ready:
            async with bound.lock:
                if not bound.ready:
                    if bound.auto_migrate:
                        await migrate(bound.engine)
                    bound.ready = True
        session = bound.factory()
        bound.sessions = {s for s in bound.sessions if s.in_transaction()}
        bound.sessions.add(session)
        return session
