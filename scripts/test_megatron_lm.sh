#!/usr/bin/env bash
# Tests against real Megatron-LM code (tests/test_megatron_lm_real.py): its trainer is not on PyPI, so they need
# a checkout of the tag matching the installed megatron-core (core_v0.16.1 for the main .venv), e.g.
#   git clone --depth 1 -b core_v0.16.1 https://github.com/NVIDIA/Megatron-LM ../megatron-lm
# Where: MEGATRON_LM_PATH, else ../megatron-lm beside this repository. Without one (or with one of another
# version) this says so and exits 0: the main suite covers Megatron-LM's formats with built fixtures.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
MLM="${MEGATRON_LM_PATH:-$ROOT/../megatron-lm}"
if [ ! -f "$MLM/megatron/training/training.py" ]; then
  echo "skipped: no Megatron-LM checkout at $MLM (set MEGATRON_LM_PATH)"; exit 0
fi
MLM="$(cd "$MLM" && pwd)"
want="$("$VPY" -c 'import importlib.metadata as m; print(m.version("megatron-core"))')"
have="$(PYTHONPATH= "$VPY" -c "import runpy; v = runpy.run_path('$MLM/megatron/core/package_info.py'); print(v['__version__'])")"
if [ "$want" != "$have" ]; then
  echo "skipped: the Megatron-LM checkout at $MLM is $have, the venv's megatron-core is $want (use tag core_v$want)"
  exit 0
fi
cd "$ROOT"
MEGATRON_LM_PATH="$MLM" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false \
  exec "$VPY" -m pytest -q -p no:cacheprovider "$@" tests/test_megatron_lm_real.py
