"""The Celery side of modelworkers: app, signal handlers, remote control, CLI."""
