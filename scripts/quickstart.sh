#!/usr/bin/env bash
# The README's main command: a complete convert -> train -> resume -> convert-back job on a tiny model.
# No GPU and no downloads needed (about 3-5 minutes on 2 CPU cores); with GPUs the same command uses them.
# Outputs go to runs/quickstart/ (override with QUICKSTART_DIR). Extra arguments go to scripts/quickstart.py.
source "$(dirname "$0")/setup_env.sh"
exec "$VPY" "$ROOT/scripts/quickstart.py" --workdir "${QUICKSTART_DIR:-$ROOT/runs/quickstart}" "$@"
