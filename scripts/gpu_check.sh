#!/usr/bin/env bash
# One prepared run on a GPU machine with no network: GPU tests, then the benchmarks at GPU sizes.
#
# Before (on a machine with network):  scripts/prepare_gpu_wheels.sh   -> .whl/ (megatron-core)
# On the GPU machine, from the repo root:  bash scripts/gpu_check.sh     (~5-8 min on one H100)
#
# Steps, each under its own time limit and all within GPU_CHECK_BUDGET seconds (default 540), so the whole run
# ends inside ~9 minutes and a failing or slow step never hides the others' results:
#   1. install .whl/*.whl into a temporary target (nothing in the image is touched)
#   2. tests/test_gpu.py (+ the GPU tests of other files): bf16 logits vs HF per family, compiled Triton RoPE
#      vs torch, bf16 training
#   3. benchmarks/bench_rope.py; bench_train.py at three sizes, each with the project, plain megatron-core and
#      HF transformers side by side: 1b (Llama-3.2-1B, seq 2048), 8b-w8 (Llama-3.1-8B width x 8 layers, seq
#      4096), moe (Qwen3-30B-A3B width x 6 layers, seq 4096)
#   3b. bench_train.py's lever ablations at 1b: the project stack with Liger's kernels, Liger's cross entropy
#      (megatron's fused one instead), the fused RoPE, cuDNN attention first, each switched in turn; and LoRA
#      (project-lora: rank 16 on every linear) for its tokens/s and training-state memory next to full training
#   4. the trainer's own CLI (torchrun -m megatron_patch.pretrain, mock data, bf16, seq 4096, distributed
#      optimizer) on the dense 8b-w8 and the moe shapes: tokens/s, TFLOP/s/GPU, peak memory from its log
#   5. bench_load.py (--size 1b)
#   6. a Markdown summary of this run's JSON lines and trainer logs
# Everything is written to $OUT (or benchmarks/results/ when OUT is unset): gpu_check.log, gpu_check.md,
# bench_{rope,train,load}.jsonl and trainer_{dense,moe}.log. Exit status: 0 only if every step passed.
#
# GPU_CHECK_DRY=1 runs the same steps on this CPU machine with .venv and tiny sizes (the GPU tests
# skip there): a check of the script itself, not of the GPU.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
STATUS="$(mktemp)"
START="$(date -u +%Y-%m-%dT%H:%M:%S)"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET

if [ "${GPU_CHECK_DRY:-0}" = "1" ]; then
  PY="$ROOT/.venv/bin/python"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  ROPE_ARGS=(); LOAD_ARGS=(--size tiny --repeats 2)
  SIZES=(tiny tiny-moe); BENCH_ITERS=(--warmup 1 --iters 2); TRAINER_SIZES=(tiny tiny-moe); TRAINER_SEQ=128
  LEVER_SIZE=tiny; LEVERS=project,project-lora,project-no-liger,project-no-rope-fusion  # the rest: GPU-only flags
  T_TESTS=300; T_ROPE=120; T_TRAIN=300; T_LEVERS=300; T_TRAINER=300; T_LOAD=180
else
  PY="${PYTHON:-python3}"
  ROPE_ARGS=(); LOAD_ARGS=(--size 1b --repeats 2 --workdir /tmp)
  SIZES=(1b 8b-w8 moe); BENCH_ITERS=(--warmup 2 --iters 6); TRAINER_SIZES=(8b-w8 moe); TRAINER_SEQ=4096
  LEVER_SIZE=1b; LEVERS=project,project-lora,project-no-liger,project-mcore-ce,project-no-rope-fusion,project-cudnn
  T_TESTS=120; T_ROPE=45; T_TRAIN=100; T_LEVERS=110; T_TRAINER=75; T_LOAD=60
fi

echo "gpu_check $START (dry=${GPU_CHECK_DRY:-0}) -> $OUT_DIR" | tee "$LOG"

# The whole run's budget (seconds): a step never runs past it (its limit shrinks to what is left, 20 s kept for
# the summary) and a step with under 15 s left is skipped, so the summary is always written in time.
BUDGET="${GPU_CHECK_BUDGET:-$([ "${GPU_CHECK_DRY:-0}" = 1 ] && echo 1800 || echo 540)}"
step() {  # step NAME SECONDS CMD...: run with a time limit, log it, record "NAME rc seconds"
  local name="$1" limit="$2"
  shift 2
  local left=$((BUDGET - SECONDS - 20))
  if [ "$left" -lt 15 ]; then
    echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left" | tee -a "$LOG"
    echo "$name skip 0" >>"$STATUS"
    return
  fi
  [ "$left" -lt "$limit" ] && limit="$left"
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
  echo "$name $rc $((SECONDS - t0))" >>"$STATUS"
}

if [ "${GPU_CHECK_DRY:-0}" != "1" ]; then
  shopt -s nullglob
  wheels=(.whl/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "error: no wheels in .whl/ (run scripts/prepare_gpu_wheels.sh first and carry .whl)" | tee -a "$LOG"
    exit 2
  fi
  SITE="$(mktemp -d /tmp/gpu_check_site.XXXX)"
  step install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi 2>&1 | tee -a "$LOG" >/dev/null
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'megatron-core', m.__version__)" 2>&1 \
  | tee -a "$LOG"

step tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu tests/
step bench_rope "$T_ROPE" "$PY" benchmarks/bench_rope.py --out "$OUT_DIR" "${ROPE_ARGS[@]}"
for size in "${SIZES[@]}"; do
  step "bench_train_$size" "$T_TRAIN" "$PY" benchmarks/bench_train.py --out "$OUT_DIR" --size "$size" "${BENCH_ITERS[@]}"
done
# Each speed lever off in turn (bench_train's project-* ablations) on the 1B shape, next to the project stack.
step "bench_levers_$LEVER_SIZE" "$T_LEVERS" "$PY" benchmarks/bench_train.py --out "$OUT_DIR" --size "$LEVER_SIZE" \
  --schedule sequential --variants "$LEVERS" --warmup 2 --iters 4
# The trainer's CLI exactly as a user starts it, on the bench shapes (config.json written by bench_train).
for size in "${TRAINER_SIZES[@]}"; do
  cfg="$(mktemp -d /tmp/gpu_check_cfg.XXXX)"
  "$PY" benchmarks/bench_train.py --size "$size" --write-config "$cfg" >/dev/null
  kind=dense; case "$size" in *moe*) kind=moe ;; esac
  step "trainer_$kind" "$T_TRAINER" bash -c "\"\$0\" -m torch.distributed.run --standalone --nproc-per-node 1 \
    -m megatron_patch.pretrain --model-config '$cfg' --mock-data --seq-length $TRAINER_SEQ --micro-batch-size 1 \
    --train-iters 15 --log-interval 5 --lr 1e-4 --min-lr 1e-5 --lr-warmup-iters 2 --use-distributed-optimizer \
    --log-throughput $( [ "${GPU_CHECK_DRY:-0}" = 1 ] || echo --bf16 ) 2>&1 | tee '$OUT_DIR/trainer_$kind.log'; \
    exit \${PIPESTATUS[0]}" "$PY"
done
step bench_load "$T_LOAD" "$PY" benchmarks/bench_load.py --out "$OUT_DIR" "${LOAD_ARGS[@]}"

# Markdown summary of this run: the step outcomes and the JSON lines written since $START.
"$PY" - "$OUT_DIR" "$START" "$STATUS" >"$OUT_DIR/gpu_check.md" <<'EOF'
import json, os, sys

out_dir, start, status = sys.argv[1:4]


def records(name):
    path = os.path.join(out_dir, f"{name}.jsonl")
    if not os.path.exists(path):
        return []
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in rows if r.get("date", "")[:19] >= start]


def table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def f(x, spec):
    return "-" if x is None else format(x, spec)


train, load, rope = records("bench_train"), records("bench_load"), records("bench_rope")


def trainer_row(kind):
    """The trainer's last log line (``iteration N/M | loss ... | tokens/s ... | TFLOP/s/GPU ... | max mem ...``)."""
    path = os.path.join(out_dir, f"trainer_{kind}.log")
    if not os.path.exists(path):
        return None
    lines = [line for line in open(path) if line.startswith("iteration")]
    if not lines:
        return [kind, "no log line", "-", "-", "-"]
    fields = dict(part.strip().rsplit(" ", 1) for part in lines[-1].split("|")[1:] if " " in part.strip())
    return [kind, fields.get("loss", "-"), fields.get("tokens/s", "-"), fields.get("TFLOP/s/GPU", "-"),
            fields.get("max mem", "-") + " GiB"]
env = (train or load or rope or [{}])[0]
print(f"# GPU check {start} UTC\n")
print(f"Device: {env.get('gpu') or env.get('cpu')}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
      f"megatron-core {env.get('megatron-core')}, triton {env.get('triton')}, "
      f"transformers {env.get('transformers')}, TE {env.get('transformer-engine')}, apex {env.get('apex')}\n")
steps = [line.split() for line in open(status)]
print(table(["step", "result", "seconds"], [[n, "pass" if rc == "0" else "skipped (budget)" if rc == "skip" else f"FAIL (exit {rc})", s]
                                              for n, rc, s in steps]))
if rope:
    print("\n## Fused RoPE (bench_rope)\n")
    print(table(["backend", "seq", "fwd ms", "bwd ms", "fwd+bwd GB/s", "of peak HBM", "kernel GB/s (graph)",
                 "kernel of peak"],
                [[r["backend"], r["seq"], f(r.get("fwd_ms"), ".3f"), f(r.get("bwd_ms"), ".3f"),
                  f(r.get("fwd_bwd_gbps"), ".0f"), f(100 * r["fraction_of_peak"], ".0f") + "%"
                  if r.get("fraction_of_peak") else "-", f(r.get("kernel_fwd_bwd_gbps"), ".0f"),
                  f(100 * r["kernel_fraction_of_peak"], ".0f") + "%" if r.get("kernel_fraction_of_peak") else "-"]
                 for r in rope]))
for size in dict.fromkeys(r["size"] for r in train):
    stacks = [r for r in train if r["size"] == size and r.get("variant") != "summary"]
    if not stacks:
        continue
    r0 = stacks[0]
    print(f"\n## Training step (bench_train): {size} ({r0['params'] / 1e6:.0f}M params), seq {r0['seq']}, "
          f"micro-batch {r0['mbs']}, {r0['precision']}\n")
    print(table(["stack", "tokens/s", "step ms", "TFLOP/s", "MFU", "peak GB"],
                [[r["variant"], f(r.get("tokens_per_s"), ",.0f"), f(1000 * r["step_s"], ".1f") if "step_s" in r
                  else "failed: " + r.get("error", "?"), f(r.get("tflops"), ".3g"),
                  f(100 * r["mfu"], ".1f") + "%" if r.get("mfu") else "-", f(r.get("peak_memory_gb"), ".1f")]
                 for r in stacks]))
    for s in (r for r in train if r["size"] == size and r.get("variant") == "summary"):
        levers = ", ".join(f"{k[len('ratio_project_over_project-'):]} {f(v, '.3f')}" for k, v in s.items()
                           if k.startswith("ratio_project_over_project-"))
        print(f"\nproject/mcore = {f(s.get('ratio_project_over_mcore'), '.3f')}, "
              f"project/hf = {f(s.get('ratio_project_over_hf'), '.3f')} (tokens/s)"
              + (f"; project over the stack without each lever: {levers}" if levers else ""))
rows = [r for r in (trainer_row("dense"), trainer_row("moe")) if r]
if rows:
    print("\n## The trainer's CLI (torchrun -m megatron_patch.pretrain, last log window)\n")
    print(table(["model", "loss", "tokens/s", "TFLOP/s/GPU", "peak memory"], rows))
if load:
    r0 = load[0]
    print(f"\n## Checkpoint load (bench_load): {r0['size']} ({r0['params'] / 1e6:.0f}M params, bf16), TP={r0['tp']}\n")
    print(table(["rank", "GB", "raw cold s", "load cold s", "load/raw cold", "raw warm s", "load warm s",
                 "load/raw warm"],
                [[r["tp_rank"], f(r["bytes"] / 1e9, ".2f"), f(r["raw_cold"], ".2f"), f(r["load_cold"], ".2f"),
                  f(r["ratio_cold"], ".2f"), f(r["raw_warm"], ".2f"), f(r["load_warm"], ".2f"),
                  f(r["ratio_warm"], ".2f")] for r in load]))
EOF
echo "summary: $OUT_DIR/gpu_check.md" | tee -a "$LOG"
cat "$OUT_DIR/gpu_check.md"
failed=$(awk '$2 != 0' "$STATUS" | wc -l)
rm -f "$STATUS"
[ "$failed" -eq 0 ]
