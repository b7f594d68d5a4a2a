"""Functions as jobs (docs/queue.md, "Job lifecycle")."""

from core.job import job


# In a project this lives in a module under app/ (e.g. app/jobs/maths.py) and has no
# `connection`; this example runs it inline on `sync` since docs/ is not an allowed module.
@job(queue="maths", max_tries=3, timeout="30s", connection="sync")
async def add(a: int, b: int) -> int:
    return a + b


async def main() -> list[int]:
    handle = await add.dispatch(2, 3)  # a handle, as for classes
    later = await add.later("10 minutes", 4, b=5)  # sync runs it at once, though
    return [await handle.result(), await later.result(), await add(1, 1)]


if __name__ == "__main__":  # `.venv/bin/python docs/examples/queue_functions.py`
    import asyncio

    print(asyncio.run(main()))
