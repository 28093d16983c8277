#!/usr/bin/env bash
# The compat job: the parity, conversion, training-resume, MoE parity/conversion, context-parallel, grouped-GEMM
# experts, LoRA, device-placement and cross-version tests on the NEWEST megatron-core, next to the main suite's
# 0.16.1 (scripts/test.sh). Extra
# arguments go to pytest.
#
# megatron-core >= 0.17 needs Python >= 3.12, so this keeps a second venv, .venv312/ in the repo root
# (git-ignored like .venv/):
#   1. Python 3.12: PYTHON312, else python3.12 on PATH, else pyenv's ~/.pyenv/versions/3.12.*;
#   2. create .venv312/ if missing (RECREATE=1 deletes it first);
#   3. torch==2.13.0 when the venv has none. PyPI has no CPU-only torch for cp312, so this is the CUDA build
#      (~1.4 GB of wheels, ~5 GB venv); it runs on CPU as is;
#   4. megatron-core==MCORE_VERSION (default: the newest release tested here), installed only when the venv
#      holds another version;
#   5. pip install -e .[test] when setup.py changed since the last install;
#   6. the main .venv (scripts/setup_env.sh; already there in CI, after scripts/test.sh): the cross-version
#      test writes checkpoints with one venv's megatron-core and reads them with the other's, both ways.
# A warm run (venvs in place) makes no network access.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv312"
MCORE_VERSION="${MCORE_VERSION:-0.19.2}"
TORCH_VERSION=2.13.0

find_py312() {  # the first candidate that runs and is 3.12 (a pyenv shim on PATH may be neither)
  local p
  for p in "${PYTHON312:-}" "$(command -v python3.12 || true)" "$HOME"/.pyenv/versions/3.12*/bin/python; do
    if [ -n "$p" ] && [ -x "$p" ] && "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$p"; return
    fi
  done
  return 1
}

if [ "${RECREATE:-0}" = 1 ]; then rm -rf "$VENV"; fi
if [ ! -x "$VENV/bin/python" ]; then
  if ! PY312="$(find_py312)"; then
    echo "error: no Python 3.12 found (tried \$PYTHON312, python3.12 on PATH, ~/.pyenv/versions/3.12*): install one (pyenv install 3.12) or set PYTHON312=/path/to/python3.12" >&2
    exit 2
  fi
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
VPY="$VENV/bin/python"
installed() {  # installed() DIST -> its version, empty when absent
  "$VPY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}
if [ -z "$(installed torch)" ]; then
  "$VPY" -m pip install -q "torch==$TORCH_VERSION"
fi
if [ "$(installed megatron-core)" != "$MCORE_VERSION" ]; then
  "$VPY" -m pip install -q "megatron-core==$MCORE_VERSION"
fi
STAMP="$VENV/.megatron-patch-installed"
if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ]; then
  "$VPY" -m pip install -q -e ".[test]"
  touch "$STAMP"
fi
bash "$ROOT/scripts/setup_env.sh"  # the main .venv, for the cross-version test
MAIN_PY="$ROOT/.venv/bin/python"

for py in "$VPY" "$MAIN_PY"; do
  "$py" - <<'EOF'
import importlib.metadata as m, sys
print("python", sys.version.split()[0], *(f"{p} {m.version(p)}" for p in
      ("torch", "megatron-core", "transformers", "numpy")), sep=" | ")
EOF
done
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false
OTHER_PYTHON="$MAIN_PY" "$VPY" -m pytest -q -p no:cacheprovider "$@" \
  tests/test_parity.py tests/test_convert.py tests/test_training.py tests/test_moe.py \
  tests/test_context_parallel.py tests/test_context_parallel_training.py tests/test_grouped_gemm.py tests/test_lora.py \
  tests/test_lora_training.py tests/test_lora_grouped.py tests/test_device_placement.py \
  tests/test_torch_dist_compat.py tests/test_cross_version.py
# The other direction: checkpoints the newest megatron-core wrote, read by the main venv's (exit status 5:
# extra arguments such as -k selected none of these tests).
OTHER_PYTHON="$VPY" "$MAIN_PY" -m pytest -q -p no:cacheprovider "$@" tests/test_cross_version.py || [ $? = 5 ]
