"""`Controller`: a home for the handlers of related topics.

    class OrderController(Controller):
        @staticmethod
        async def handle_new_order(order_id: str, payload, client):
            ...

    router.on("orders/{order_id}/new", OrderController.handle_new_order)

Handlers are static (or class) methods, so the router calls them like plain functions and
passes what they ask for by name: path parameters, `payload`, `client`, `context`.
"""

from __future__ import annotations

import logging
from typing import ClassVar

__all__ = ["Controller"]


class Controller:
    """Base class for controllers. It holds no state: controllers group handlers by topic.

    Attributes:
        logger: A logger named after the controller (`topiq.app.OrderController`).
    """

    logger: ClassVar[logging.Logger] = logging.getLogger("topiq.app.Controller")

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.logger = logging.getLogger(f"topiq.app.{cls.__name__}")
