#!/usr/bin/env bash
# Every GPU measurement of issue 14 in one run (<= 6 minutes on an H200), one table:
# mixture op vs the per-slot loop, training step SAPT-15 vs peft LoRA (7B-wide slice),
# generation vs the plain backbone, the engine's graph mode vs eager, ZeRO-3 vs ZeRO-0
# on one GPU. Run from anywhere:
#   bash bench/gpu_bench.sh                     # on a GPU machine: every part
#   bash bench/gpu_bench.sh --parts op,step     # some parts
#   bash bench/gpu_bench.sh --dry               # CPU, tiny shapes: the paths and the table
# The graph and zero3 parts need DeepSpeed. A GPU machine without it (the lent H200 has
# torch, transformers and peft, not deepspeed) gets it as wheels carried in .whl/:
#   here, once:   bash bench/gpu_bench.sh --fetch-wheels     (needs pip and the index)
#   there:        python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#                 && PYTHONPATH=/tmp/site bash bench/gpu_bench.sh
# Installs nothing itself. Exit: 0 ran, 1 a part failed (--strict: or a target missed),
# 2 no GPU (without --dry).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  # DeepSpeed's version is the one pinned for this project (pyproject); its pure-Python
  # wheel is built here (DS_BUILD_OPS=0: no compiled ops), its few missing dependencies
  # are downloaded for the GPU machine's Python 3.12 on x86-64
  ds=$("${PYTHON:-python}" -c "import deepspeed; print(deepspeed.__version__)")
  mkdir -p .whl
  exclude=$(git rev-parse --git-path info/exclude)  # .whl/ travels untracked, never committed
  grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  # setup.py imports torch: build against the installed one, not an isolated env
  DS_BUILD_OPS=0 "${PYTHON:-python}" -m pip wheel --no-deps --no-build-isolation -w .whl \
    "deepspeed==$ds"
  "${PYTHON:-python}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl hjson pydantic pydantic-core annotated-types typing-inspection
  ls -l .whl
  exit 0
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
rc=0
"${PYTHON:-python}" bench/gpu_bench.py "$@" || rc=$?
# issue 21: the training step against a plain loop, train.compile off and on (skipped by
# the CPU dry mode, which the smoke tests run)
case " $* " in
  *" --dry "*) ;;
  *)
    for mode in off graphs; do
      PYTHONPATH=. "${PYTHON:-python}" bench/bench_engine_step.py --device cuda --steps 10 \
        --compile "$mode" || rc=1
    done
    ;;
esac
exit "$rc"
