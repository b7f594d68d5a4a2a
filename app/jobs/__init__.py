"""Background jobs; the worker runs only `Job` subclasses under `app.` (QUEUE_ALLOWED_MODULES)."""
