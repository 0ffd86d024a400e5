#!/usr/bin/env bash
# One-shot GPU check: one table of pool-scoring / training / validation throughput (training and validation in
# float32 and in mixed precision), peak memory, scoring cost over one encoder pass, and the scoring autocast's
# score fidelity against float32, for hiera_t and hiera_l at 512 px and hiera_l at 1024 px with activation
# checkpointing; batch 4, seeded random weights (no checkpoint), no network. Then the torch.compile'd encoder of hiera_t at 512. Stopped after 5 minutes (GPU_CHECK_TIMEOUT);
# rows print as they finish. What each column means: benchmarks/gpu_check.py. With two GPUs or more, first one run
# on all of them under torchrun against one GPU (benchmarks/bench_distributed.py, stopped after GPU_CHECK_DDP_TIMEOUT).
#
#   bash benchmarks/gpu_check.sh                   # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run         # the same code on the CPU at toy sizes (CI runs this)
#   bash benchmarks/gpu_check.sh --prepare-wheels  # beforehand, where PyPI is reachable: the pure-Python packages
#                                                  # a bare GPU image lacks, as wheels in .whl/ (git-ignored)
# Other arguments go to benchmarks/gpu_check.py (e.g. --configs t:512 l:1024:ckpt --compile l:512).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
NEEDED="hydra omegaconf antlr4 scipy PIL"  # import names needed beyond torch and numpy
PURE_PYTHON=("hydra-core>=1.3.2" "omegaconf>=2.2,<2.4" "antlr4-python3-runtime==4.9.*")

case "${1:-}" in
  --prepare-wheels)
    mkdir -p "$WHEELS"
    "$PY" -m pip wheel --no-deps --wheel-dir "$WHEELS" "${PURE_PYTHON[@]}"
    echo "wheels in $WHEELS: bring that folder along to the GPU machine"
    exit 0 ;;
  --dry-run)
    exec "$PY" benchmarks/gpu_check.py "$@" ;;
esac

missing=$("$PY" -c "import importlib.util as u; print(' '.join(m for m in '$NEEDED'.split() if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "error: Python modules missing: $missing, and no wheels in $WHEELS/." \
         "Where PyPI is reachable, run: bash benchmarks/gpu_check.sh --prepare-wheels" >&2
    exit 2
  fi
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
# Several GPUs: one run on all of them under torchrun against the same run on one (pool scoring and validation per
# epoch, selections equal?); docs/several_gpus.md. Skipped with fewer than two GPUs.
gpus=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
if [ "${gpus:-0}" -ge 2 ]; then
  timeout "${GPU_CHECK_DDP_TIMEOUT:-600}" "$PY" benchmarks/bench_distributed.py --device cuda --nproc "$gpus" \
    --model sam2.1_hiera_l --img_size 1024 || echo "several-GPU check failed or timed out (exit $?)"
fi
exec timeout "${GPU_CHECK_TIMEOUT:-300}" "$PY" benchmarks/gpu_check.py --compile t:512 "$@"
