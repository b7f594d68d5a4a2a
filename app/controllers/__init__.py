"""Controllers: handlers for related topics, grouped as static methods."""
