"""Packed SFT computes what the separate conversations compute: the per-token losses of a packed run equal
the unpacked run's on the same conversations (a broken packing mask or position reset changes them)."""

import json

import torch

from megatron_patch.runtime import spawn

WORDS = "the cat sat on a mat while dogs ran in the park and birds sang all day long".split()


def _loss_worker(cfg_dir: str, tok_dir: str, data: str, seq: int):
    from transformers import AutoTokenizer

    from megatron_patch import runtime
    from megatron_patch.models.builder import build_model, transformer_config
    from megatron_patch.models.family import args_from_hf, read_hf_config
    from megatron_patch.training.sft import SFTDataset, SFTReport, pack, read_conversations

    args = args_from_hf(read_hf_config(cfg_dir))
    runtime.initialize(seed=3)
    model = build_model(args, transformer_config(args), transformer_impl="local", rope_impl="torch").eval()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    convs = read_conversations([data], tok, seq, SFTReport())

    def per_token_losses(dataset) -> list[float]:
        out = []
        for i in range(len(dataset)):
            s = dataset[i]
            mask = s.get("attention_mask")
            with torch.no_grad():
                loss = model(s["tokens"][None], s["position_ids"][None],
                             None if mask is None else mask[None], labels=s["labels"][None])[0]
            out += loss[s["loss_mask"] > 0].tolist()
        return out

    packed = SFTDataset(pack(convs, seq), seq, tok.eos_token_id, packed=True)
    unpacked = SFTDataset([[c] for c in convs], seq, tok.eos_token_id, packed=False)
    # Shuffled packing: the same conversations in another grouping must give the same losses too.
    shuffled = SFTDataset(pack(convs[::-1], seq), seq, tok.eos_token_id, packed=True)
    return len(packed), len(unpacked), per_token_losses(packed), per_token_losses(unpacked), \
        per_token_losses(shuffled)


def test_packed_losses_equal_unpacked(tmp_path):
    from megatron_patch.testing.tiny_models import hf_config
    from toolkits.data.tokenizer import train_tokenizer

    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    tok = train_tokenizer(texts, str(tmp_path / "tok"), vocab_size=300)
    hf_config("qwen3", vocab_size=len(tok)).save_pretrained(str(tmp_path / "cfg"))
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            msgs = [{"role": "user", "content": " ".join(WORDS[i:i + 2 + i % 3])},
                    {"role": "assistant", "content": " ".join(WORDS[i + 1:i + 4 + i % 4])}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    n_packed, n_unpacked, packed, unpacked, shuffled = spawn.run(
        _loss_worker, 1, str(tmp_path / "cfg"), str(tmp_path / "tok"), str(data), 96)[0]
    assert n_packed < n_unpacked == 8  # several conversations share a sample
    assert len(packed) == len(unpacked) > 20
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(unpacked), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(sorted(shuffled)), torch.tensor(sorted(unpacked)), rtol=1e-5, atol=1e-5)
