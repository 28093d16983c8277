"""The trainer's training trajectory equals a plain HF ``transformers`` training loop, fp32.

A tiny HF Llama is converted with ``toolkits.checkpoint.convert.hf2mcore`` and fine-tuned for a few
Adam steps by the trainer (``--load CKPT --finetune --mock-data``) at several layouts in one 2-process
gloo launch. The same batches (rebuilt with the trainer's own ``MockDataset`` and sample-order
function) are replayed in ``LlamaForCausalLM`` with ``torch.optim.Adam`` and the same lr / betas / eps,
and the per-iteration losses (per-token mean over the global batch) are compared.

Tolerances: step 1 is a pure forward of identical weights (logits agree to ~1e-6, ``test_parity``);
later steps follow Adam updates computed from gradients that differ only by fp32 summation order
(TP/DP all-reduces, split matmuls, pipeline hand-offs). Measured: <= 6e-7 relative over 5 steps at
every layout, so rel 1e-5 is asserted for every step. ``test_reference_is_sensitive`` shows what that
tolerance catches: a 1% lr error alone moves the HF losses by ~3e-4, far outside it.

Vocab padding: with the default ``--make-vocab-size-divisible-by 128`` the vocab (250) is padded to 256.
Megatron-LM lets the padded entries take part in the softmax (a 256-class loss, 4e-3 above HF's here);
``models.builder.mask_vocab_padding`` keeps them out, so the padded run must match HF too.
"""

import json
import os

import pytest
import torch

from megatron_patch.runtime import spawn

SEQ, GBS, ITERS, LR, SEED = 32, 4, 5, 1e-2, 11  # lr 1e-2: large enough that Adam moves the losses
BETAS, EPS = (0.9, 0.95), 1e-8
RTOL = 1e-5

# name: (extra trainer args, make_vocab_size_divisible_by of both the checkpoint and the run)
LAYOUTS = {
    "tp1_pp1_dp2": (["--micro-batch-size", "1"], 1),
    "tp2": (["--tensor-model-parallel-size", "2", "--micro-batch-size", "1"], 1),
    "pp2": (["--pipeline-model-parallel-size", "2", "--micro-batch-size", "2"], 1),
    "tp1_pp1_dp2_pad128": (["--micro-batch-size", "1"], 128),  # the default padding (256 > 250): masked
}


def _argv(ckpt: str, metrics: str, extra: list[str], divisible_by: int) -> list[str]:
    return ["--load", ckpt, "--finetune", "--mock-data", "--seq-length", str(SEQ), "--global-batch-size", str(GBS),
            "--train-iters", str(ITERS), "--lr", str(LR), "--lr-decay-style", "constant", "--lr-warmup-iters", "0",
            "--weight-decay", "0", "--clip-grad", "0", "--adam-beta1", str(BETAS[0]), "--adam-beta2", str(BETAS[1]),
            "--adam-eps", str(EPS), "--transformer-impl", "local", "--rope-impl", "torch", "--seed", str(SEED),
            "--make-vocab-size-divisible-by", str(divisible_by), "--log-interval", "100",
            "--metrics-file", metrics] + extra


def _losses(path: str) -> list[float]:
    return [json.loads(line)["loss"] for line in open(path) if '"loss"' in line]


def _trainer_worker(ckpts: dict, tmp: str):
    import torch.distributed as dist

    from megatron_patch import pretrain

    for name, (extra, div) in LAYOUTS.items():
        config = pretrain.prepare(_argv(ckpts[div], os.path.join(tmp, f"{name}.jsonl"), extra, div))
        rc = pretrain.run(config, teardown=False)
        assert rc == 0, f"{name} failed with {rc}"
        dist.barrier()
    return True


def trainer_batches(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, labels) [GBS, SEQ] of each iteration, from the trainer's own data functions."""
    return trainer_batches_for(vocab, SEQ, GBS, ITERS, SEED)


def trainer_batches_for(vocab: int, seq: int, gbs: int, iters: int, seed: int):
    from megatron_patch.training.data import MockDataset, collate, microbatch_indices

    ds = MockDataset(vocab, seq, seed, iters * gbs)  # what pretrain.build_datasets makes for --mock-data
    out = []
    for it in range(iters):
        # One micro-batch of the whole global batch on one rank: the global batch's sample indices.
        (idx,) = microbatch_indices(it * gbs, gbs, 1, 0, 1)
        b = collate([ds[i] for i in idx])
        assert torch.equal(b["loss_mask"], torch.ones(gbs, seq)) and torch.equal(b["position_ids"][0], torch.arange(seq))
        out.append((b["tokens"], b["labels"]))
    return out


def hf_losses(hf_dir: str, batches, lr: float = LR) -> list[float]:
    """Plain HF loop: fp32 LlamaForCausalLM, torch Adam, per-token mean cross entropy over the batch."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).train()
    return adam_losses(model, model.parameters(), batches, lr)


def adam_losses(model, params, batches, lr: float, eps: float = EPS, train: bool = True) -> list[float]:
    """The loss of each (tokens, labels) batch, each followed by a torch Adam step (wd 0) on ``params``."""
    opt = torch.optim.Adam(params, lr=lr, betas=BETAS, eps=eps, weight_decay=0.0)
    losses = []
    for tokens, labels in batches:
        opt.zero_grad()
        logits = model(input_ids=tokens).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        if train:
            loss.backward()
            opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_patch.testing.tiny_models import save_tiny_model
    from toolkits.checkpoint.convert import hf2mcore

    tmp = tmp_path_factory.mktemp("train_vs_hf")
    hf = save_tiny_model("llama3.1", str(tmp / "hf"))
    ckpts = {div: hf2mcore(hf, str(tmp / f"mcore_div{div}"), transformer_impl="local", params_dtype="fp32",
                           make_vocab_size_divisible_by=div)
             for div in {d for _, d in LAYOUTS.values()}}
    spawn.run(_trainer_worker, 2, ckpts, str(tmp), timeout=600)
    return {"hf": hf, "losses": {name: _losses(str(tmp / f"{name}.jsonl")) for name in LAYOUTS}}


@pytest.fixture(scope="module")
def reference(runs):
    from megatron_patch.testing.tiny_models import VOCAB

    return hf_losses(runs["hf"], trainer_batches(VOCAB))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_losses_match_hf_training_loop(runs, reference, name):
    got = runs["losses"][name]
    rel = [abs(a - b) / abs(b) for a, b in zip(got, reference)]
    print(f"\n{name}\n  trainer {got}\n  hf      {reference}\n  rel     {[f'{r:.2e}' for r in rel]}")
    assert len(got) == ITERS
    assert rel[0] <= RTOL, f"step 1 (forward only) differs: {got[0]} vs HF {reference[0]}"
    assert max(rel) <= RTOL, f"trajectory differs from HF: max rel {max(rel):.2e} at step {rel.index(max(rel)) + 1}"


def test_reference_is_sensitive(runs, reference):
    """The replay loop reacts to the things the comparison is meant to catch, far above RTOL."""
    from megatron_patch.testing.tiny_models import VOCAB

    batches = trainer_batches(VOCAB)
    wrong_lr = hf_losses(runs["hf"], batches, lr=LR * 0.99)
    shifted = hf_losses(runs["hf"], batches[1:] + batches[:1])  # off-by-one batch order
    for other in (wrong_lr, shifted):
        assert max(abs(a - b) / abs(b) for a, b in zip(other, reference)) > 10 * RTOL
