"""The application: routes (`app.routes`), controllers and jobs."""
