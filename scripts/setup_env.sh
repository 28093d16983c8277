# Sourced by quickstart.sh and test.sh: create or reuse .venv in the repo root and install the project.
# On a machine with no torch, the CPU build torch==2.13.0 is installed first, so that pip never pulls
# a multi-GB CUDA build to satisfy setup.py's torch>=2.6. A venv that already has torch keeps it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "torch==2.13.0"
fi
# Reinstall only when setup.py changed since the last install.
STAMP=.venv/.megatron-patch-installed
if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ]; then
  "$VPY" -m pip install -q -e ".[test]"
  touch "$STAMP"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false
