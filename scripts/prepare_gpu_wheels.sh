#!/usr/bin/env bash
# Download, on THIS machine, the wheels that scripts/gpu_check.sh installs on a GPU machine with no
# network (Python 3.12, x86-64 Linux, torch/triton/transformers preinstalled; no megatron-core).
#
# Missing there: megatron-core itself, and liger-kernel (pure-Python Triton kernels: the SwiGLU and cross-entropy
# fusions of fusions/liger.py). Their own requirements (torch, numpy, packaging, triton) and this project's
# (safetensors, transformers, tokenizers, tqdm, psutil, pytest) are in that image, and this script checks
# that against megatron-core's wheel metadata. The wheels land in .whl/ (git-ignored), which a device run
# must name in its `carry` list.
#
#   scripts/prepare_gpu_wheels.sh                      # megatron-core 0.19.2: the newest tested (compat job, Python 3.12)
#   MCORE_VERSION=0.16.1 scripts/prepare_gpu_wheels.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEST="$ROOT/.whl"
PY="${PYTHON:-python3}"
MCORE_VERSION="${MCORE_VERSION:-0.19.2}"
# What the GPU image already provides (KINDS.md's package list); a requirement outside it must be carried too.
IMAGE_HAS="torch numpy packaging safetensors transformers tokenizers tqdm psutil triton pytest"

mkdir -p "$DEST"
# One version of each package: two wheels of the same name would stop the whole install there.
find "$DEST" -maxdepth 1 -name 'megatron_core-*.whl' ! -name "megatron_core-${MCORE_VERSION}-*" -delete
# manylinux tags are matched exactly by pip, so every tag the wheel might carry is listed.
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -q -d "$DEST" "megatron-core==${MCORE_VERSION}"
LIGER_VERSION="${LIGER_VERSION:-0.8.5}"
find "$DEST" -maxdepth 1 -name 'liger_kernel-*.whl' ! -name "liger_kernel-${LIGER_VERSION}-*" -delete
"$PY" -m pip download --no-deps --only-binary=:all: -q -d "$DEST" "liger-kernel==${LIGER_VERSION}"

WHEEL="$(ls "$DEST"/megatron_core-"${MCORE_VERSION}"-cp312-*.whl | head -n1)"
missing=""
for req in $("$PY" - "$WHEEL" <<'EOF'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            print(re.split(r"[\s;<>=!~\[(]", line.split(":", 1)[1].strip())[0].lower())
EOF
); do
  case " $IMAGE_HAS " in *" $req "*) ;; *) missing="$missing $req" ;; esac
done
if [ -n "$missing" ]; then
  echo "error: megatron-core ${MCORE_VERSION} needs packages the GPU image may lack:${missing}; add them here" >&2
  exit 1
fi
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 && ! git -C "$ROOT" check-ignore -q "$DEST"; then
  echo "warning: .whl/ is not git-ignored; add '/.whl/' to .gitignore (or .git/info/exclude)" >&2
fi
echo "wheels in $DEST (carry '.whl' to the device run):"
ls -l "$DEST"
