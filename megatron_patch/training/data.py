"""Training data: the tokenizer, megatron-core's GPTDataset (blends, splits, cached indices), and the
order in which samples reach each data-parallel rank (``build_datasets``: what a run's ``DataSettings`` ask for).

Sample order follows Megatron-LM's pretraining sampler: the global batch of iteration ``i`` holds
samples ``[i*gbs, (i+1)*gbs)``; micro-batch ``k`` of data-parallel rank ``r`` is the slice
``k*mbs*dp + r*mbs + [0, mbs)``. The position in the data is therefore a pure function of the
consumed-sample count, which the checkpoint stores: a resumed run sees exactly the batches an
uninterrupted one would. Every rank reads its batch itself (reading is cheap next to the model), so
TP ranks and pipeline stages get identical batches without a broadcast.
"""

from __future__ import annotations

import logging
import os

import torch

from megatron_patch import data_checks
from megatron_patch.training.config import DataSettings, RunConfig
from megatron_patch.training.errors import DataError

log = logging.getLogger(__name__)


class DatasetTokenizer:
    """The few attributes megatron-core's datasets read from a tokenizer, over a HF tokenizer."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        eod = hf_tokenizer.eos_token_id
        if eod is None:
            raise DataError("the tokenizer has no eos_token: an end-of-document token is required")
        self.eod = eod
        # megatron-core hashes the dataset description, tokenizer included, to name its index cache.
        self.unique_identifiers = {"class": type(hf_tokenizer).__name__,
                                   "name_or_path": str(getattr(hf_tokenizer, "name_or_path", "")),
                                   "vocab_size": self.vocab_size, "eod": eod}

    # No `pad` attribute on purpose: GPTDataset then treats no token id as padding, so an EOS that
    # doubles as pad (common in HF tokenizers) is still trained on.

    def tokenize(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]


def load_tokenizer(path: str):
    """The HF tokenizer in directory ``path`` (``DataError`` if it cannot be read)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise DataError(f"tokenizer directory {path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises several types for a broken directory
        raise DataError(f"cannot load a HF tokenizer from {path}: {str(e).splitlines()[0]}") from None


def build_datasets(config: RunConfig):
    """(train, valid, test) datasets of a run (mock, indexed pretraining data or SFT JSONL); checked before any
    heavy work. ``valid`` serves ``--eval-interval``; this trainer evaluates no test split."""
    d, b, s = config.data, config.batch, config.schedule
    n_train = s.train_iters * b.global_batch_size
    n_eval = (s.train_iters // s.eval_interval + 1) * s.eval_iters * b.global_batch_size if s.eval_interval else 0
    vocab = config.model.vocab_size
    if d.mock:
        return (for_training(MockDataset(vocab, b.seq_length, config.seed, n_train), d, config.seed),
                MockDataset(vocab, b.seq_length, config.seed + 1, max(n_eval, 1)), None)
    tok = load_tokenizer(d.tokenizer_model)
    if len(tok) > vocab:
        raise DataError(f"the tokenizer has {len(tok)} tokens but the model's vocab_size is {vocab}")
    if d.sft:
        from megatron_patch.training import sft

        return sft.build_sft_datasets(d, b.seq_length, config.seed, tok)
    train, valid, test = build_pretraining_datasets(d, b.seq_length, config.seed, DatasetTokenizer(tok),
                                                    [n_train, n_eval, 0])
    validate_sizes(train, n_train)
    return for_training(train, d, config.seed), valid, test


def build_pretraining_datasets(data: DataSettings, seq_length: int, seed: int, tokenizer: DatasetTokenizer,
                               sizes: list[int]):
    """(train, valid, test) GPTDatasets via megatron-core's BlendedMegatronDatasetBuilder.

    Rank 0 builds the index caches first; the other ranks then read them (as Megatron-LM does), so
    no two processes race to write the same cache file.
    """
    import torch.distributed as dist
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_patch.training.arguments import parse_blend  # Megatron-LM's 'W1 PREFIX1 W2 PREFIX2' spelling

    blend, split, per_split = None, None, None
    # Files and splits checked first: megatron-core would misread a damaged index, or loop forever on an empty split.
    if data.train_data_path:  # Megatron-LM's per-split paths: no --split
        per_split = [parse_blend(p) if p else None for p in (data.train_data_path, data.valid_data_path, None)]
        for b, name in zip(per_split, data_checks.SPLITS):
            if b:
                data_checks.check_splits(b[0], None, names=(name,))
    else:
        blend, split = parse_blend(data.data_path), data.split
        data_checks.check_splits(blend[0], data_checks.parse_split(split), split)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=per_split,
        split=split,
        path_to_cache=data.data_cache_path,
        tokenizer=tokenizer,
        # Megatron-LM's --reset-position-ids / --reset-attention-mask / --eod-mask-loss, done by GPTDataset.
        reset_position_ids=data.reset_position_ids,
        reset_attention_mask=data.reset_attention_mask,
        eod_mask_loss=data.eod_mask_loss,
        # Only then is a mask needed (document boundaries); otherwise the model's causal mask is the mask.
        create_attention_mask=data.reset_attention_mask,
        mmap_bin_files=True,
    )

    def build():
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        out = build()
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        out = build()
    return out


class MockDataset(torch.utils.data.Dataset):
    """Deterministic random tokens (for smoke tests without data)."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int, size: int):
        self.vocab, self.seq, self.seed, self.size = vocab_size, seq_length, seed, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + idx)
        # Samples are made on the host (device="cpu") and moved to the device a step at a time (step_batches).
        text = torch.randint(0, self.vocab, (self.seq + 1,), generator=g, device="cpu")
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(self.seq, device="cpu"),
                "position_ids": torch.arange(self.seq, device="cpu")}


class CyclicOrder(torch.utils.data.Dataset):
    """``--dataloader-type cyclic``: every epoch visits the samples in a fresh seeded random order.

    Sample ``i`` of the stream is sample ``perm_e[i mod n]`` with ``e = i // n`` and ``perm_e`` a permutation
    seeded by (seed, e): a pure function of the position, so a resumed run reads what an uninterrupted one
    would. Its length is unbounded (``step_batches`` wraps indices at the length).
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.n = dataset, seed, len(dataset)
        self._perm: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.n * 1_000_000

    def order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm = {epoch: torch.randperm(self.n, generator=gen, device="cpu")}
        return self._perm[epoch]

    def __getitem__(self, i: int):
        return self.dataset[int(self.order(i // self.n)[i % self.n])]


class ParallelReads(torch.utils.data.Dataset):
    """``--num-workers N``: a step's samples are read by N worker threads (the dataset's reads and index
    arithmetic release the GIL), in the same order as without workers."""

    def __init__(self, dataset, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        self.dataset, self.pool = dataset, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="data")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i]

    def get_many(self, indices: list[int]) -> list:
        return list(self.pool.map(self.dataset.__getitem__, indices))


def for_training(dataset, data: DataSettings, seed: int):
    """The training dataset in the order ``--dataloader-type`` asks for, read by ``--num-workers`` workers."""
    if dataset is None:
        return None
    if data.dataloader_type == "cyclic":
        dataset = CyclicOrder(dataset, seed)
    if data.num_workers > 0:
        dataset = ParallelReads(dataset, data.num_workers)
    return dataset


def collate(samples: list[dict]) -> dict:
    batch = {}
    for key in samples[0]:
        batch[key] = torch.stack([torch.as_tensor(s[key], device="cpu") for s in samples])
    return batch


def microbatch_indices(consumed: int, mbs: int, dp: int, dp_rank: int, num_microbatches: int) -> list[list[int]]:
    """Sample indices of each micro-batch this data-parallel rank processes in the next step."""
    out = []
    for k in range(num_microbatches):
        start = consumed + k * mbs * dp + dp_rank * mbs
        out.append(list(range(start, start + mbs)))
    return out


def step_batches(dataset, consumed: int, mbs: int, dp: int, dp_rank: int, num_microbatches: int,
                 device: torch.device, cut=None) -> list[dict]:
    """The micro-batches of one optimizer step, on ``device``; ``cut`` (a collated batch -> this rank's part,
    e.g. its context-parallel share) runs on the host, before the copy."""
    n = len(dataset)
    batches = []
    for idx in microbatch_indices(consumed, mbs, dp, dp_rank, num_microbatches):
        # Wrap around: the builder sizes the dataset for train_iters*gbs samples, so wrapping only
        # happens for evaluation batches past the end of a small validation split.
        wrapped = [i % n for i in idx]
        batch = collate(dataset.get_many(wrapped) if hasattr(dataset, "get_many") else [dataset[i] for i in wrapped])
        batch = cut(batch) if cut is not None else batch
        # Page-locked on a GPU so the copy is asynchronous (non_blocking from pageable memory still waits);
        # torch's caching host allocator reuses the pinned blocks step after step.
        pin = torch.device(device).type == "cuda"
        batches.append({k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in batch.items()})
    return batches


def as_iterators(batches: list[dict], num_chunks: int):
    """Each (virtual) model chunk walks the step's micro-batches with its own iterator."""
    if num_chunks == 1:
        return iter(batches)
    return [iter(batches) for _ in range(num_chunks)]


def validate_sizes(train, needed: int) -> None:
    if train is None or len(train) == 0:
        raise DataError("the training split is empty: check --split and the amount of data")
    if len(train) < needed:
        log.warning("training split has %d samples, fewer than the %d the run consumes; it will wrap",
                    len(train), needed)
