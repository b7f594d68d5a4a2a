"""Masonite's queue.push forms in Topiq (docs/coming-from.md, "Masonite")."""

from core.job import Job
from core.queue.queue_manager import queue


# In a project these live in app/jobs/ (e.g. app/jobs/send_welcome_email.py).
class SendWelcomeEmail(Job):
    queue = "emails"

    def handle(self, email: str = "everyone@example.com") -> str:  # runs in a thread
        return f"welcome mail to {email}"


class TutorialEmail(Job):
    queue = "emails"

    def __init__(self, var1: str, var2: str) -> None:
        self.var1 = var1
        self.var2 = var2

    async def handle(self) -> str:
        return f"tutorial with {self.var1} and {self.var2}"


def run_async(obj1: int, obj2: int) -> int:  # any module-level function
    return obj1 + obj2


async def main() -> list[object]:
    handles = [
        await queue.push(SendWelcomeEmail),  # a class: built with no arguments
        await queue.push(SendWelcomeEmail, args=["user@email.com"]),  # handle("user@...")
        await queue.push(TutorialEmail("val1", "val2"), queue="invoices"),  # Masonite 4
        await queue.push(run_async, args=(2, 3)),  # a function and its arguments
    ]
    # Several jobs in one call (one round trip): a list of handles, in order.
    handles += await queue.push(SendWelcomeEmail, TutorialEmail("a", "b"))

    later = await queue.push(SendWelcomeEmail, wait="10 minutes")  # the delay
    status = await later.status()
    await later.cancel()
    return [await h.result(timeout=30) for h in handles] + [status.status]
