#!/usr/bin/env bash
# The test suite: sets up .venv (see setup_env.sh), then runs pytest. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
exec "$VPY" -m pytest -q -p no:cacheprovider "$@" tests
