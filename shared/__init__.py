"""Framework-free core of modelworkers: settings, manifest, model families, registry, schemas.

Nothing in this package imports Celery, so a web app or a notebook can use the registry and the
model families directly. Dependencies run one way: ``workers -> tasks -> shared``.
"""
