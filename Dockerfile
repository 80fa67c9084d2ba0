# One image for workers, Flower and the CLI.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 MODEL_REPOSITORY=/app/models
COPY pyproject.toml README.md ./
COPY shared shared
COPY tasks tasks
COPY workers workers
COPY celeryconfig.py ./
# CPU build of torch first: a plain `torch` from PyPI is a multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" \
 && pip install .
COPY models models
RUN useradd --create-home worker && chown -R worker /app
USER worker
CMD ["celery", "-A", "workers.app", "worker", "--loglevel", "INFO"]
