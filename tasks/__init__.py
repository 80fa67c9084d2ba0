"""Celery tasks, one module per family. The public contract is documented in docs/tasks.md."""
