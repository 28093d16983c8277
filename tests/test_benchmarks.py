"""The GPU benchmarks' code runs in every suite run, at CPU sizes, so it cannot rot between GPU runs.

``benchmarks/bench_train.py`` builds three training stacks (this project's trainer, plain megatron-core, HF
transformers) for a dense and a MoE model: the same builders the GPU sizes use. Beyond "it runs", the
project's stack must train exactly the model plain megatron-core trains (same seed, same data: the same losses
to the bit), and HF's the same function (the same first loss up to init differences is not asserted: HF
initializes differently).
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = """
import sys
sys.path.insert(0, "benchmarks")
import bench_train
for size in ("tiny", "tiny-moe"):
    rc = bench_train.main(["--size", size, "--warmup", "0", "--iters", "2", "--out", sys.argv[1]])
    assert rc == 0, size
# The lever ablations (GPU levers off; on CPU the same kernels, so the same model and losses) by trainer flags.
rc = bench_train.main(["--size", "tiny-moe", "--warmup", "0", "--iters", "2", "--out", sys.argv[1], "--schedule",
                       "sequential", "--variants", "project-no-liger,project-no-rope-fusion,project-no-grouped-gemm"])
assert rc == 0, "ablations"
"""


def test_bench_train_stacks_run_and_agree(tmp_path):
    r = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "bench_train.jsonl")]
    for size in ("tiny", "tiny-moe"):
        stacks = {r["variant"]: r for r in rows if r["size"] == size}
        ablations = {"project-no-liger", "project-no-rope-fusion", "project-no-grouped-gemm"}
        assert set(stacks) == {"project", "mcore", "hf", "summary"} | (ablations if size == "tiny-moe" else set())
        for name in ablations & set(stacks):
            assert "error" not in stacks[name], stacks[name]
            assert stacks[name]["loss_last"] == stacks["project"]["loss_last"], name
        for name in ("project", "mcore", "hf"):
            assert "error" not in stacks[name] and stacks[name]["tokens_per_s"] > 0, stacks[name]
        assert stacks["project"]["loss_first"] == stacks["mcore"]["loss_first"], size
        assert stacks["project"]["loss_last"] == stacks["mcore"]["loss_last"], size
        assert stacks["hf"]["loss_last"] == stacks["hf"]["loss_last"]  # finite (NaN != NaN)
