"""A readiness probe of your own, on the check `health` and `/health` use (docs/observing.md)."""

from core.health import check_health
from core.queue.queue_manager import QueueManager


async def ready(manager: QueueManager, need_workers: bool = True) -> tuple[int, dict[str, object]]:
    """An HTTP status and body: 200 when the backend answers (and a worker lives), else 503."""
    health = await check_health(await manager.connection(), need_workers=need_workers)
    return (200 if health.ok else 503), health.to_dict()
