# One image for workers, Flower and the CLI; a CPU image by default, a GPU image with
#   docker build -t modelworkers:cpu .
#   docker build --build-arg TORCH_VARIANT=cuda -t modelworkers:gpu .
# Layers from the least to the most often changed: torch, the other dependencies (from
# pyproject.toml alone), then the code and the models. An edit under shared/, tasks/ or workers/
# rebuilds only the last layers, never the torch one.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# cpu: torch from TORCH_INDEX_URL alone (default: PyTorch's CPU index, a few hundred MB).
# cuda: torch from PyPI, whose Linux wheels are CUDA builds (with the CUDA libraries as pip
# packages: no CUDA base image needed; the host needs the NVIDIA driver and container toolkit),
# plus TORCH_INDEX_URL when given (e.g. https://download.pytorch.org/whl/cu128).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
# The extras in the image: ONNX Runtime (the CPU backend of transformers models), and Flower,
# which runs from the same image (docker-compose.yml, Kubernetes).
ARG EXTRAS=onnx,flower

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODELWORKERS_MODEL_REPOSITORY=/app/models \
    MODELWORKERS_MODEL_CACHE_DIR=/app/models/cache
WORKDIR /app
RUN useradd --create-home --uid 10001 worker

RUN set -eu; \
    case "$TORCH_VARIANT" in \
      cpu)  pip install "torch==${TORCH_VERSION}" \
              --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) pip install "torch==${TORCH_VERSION}" \
              ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ;; \
      *)    echo "TORCH_VARIANT=$TORCH_VARIANT: expected cpu or cuda" >&2; exit 1 ;; \
    esac

# The dependencies listed in pyproject.toml (and EXTRAS), without the code: this layer is
# rebuilt only when pyproject.toml changes. torch is already there and satisfies its pin.
COPY pyproject.toml ./
RUN python -c "import os, subprocess, sys, tomllib; \
project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in os.environ.get('EXTRAS', '').split(',') if e]; \
deps = project['dependencies'] + [d for e in extras for d in project['optional-dependencies'][e]]; \
subprocess.run([sys.executable, '-m', 'pip', 'install', *deps], check=True)"

# The code, installed without touching the dependencies, then the model repository.
COPY README.md celeryconfig.py ./
COPY shared shared
COPY tasks tasks
COPY workers workers
RUN pip install --no-deps .
COPY --chown=worker models models
USER worker
CMD ["celery", "-A", "workers.app", "worker", "--loglevel", "INFO"]
