"""Mixtral (8x7B, 8x22B): every layer MoE, softmax top-k routing with the top-k renormalized (megatron's
``moe_router_pre_softmax=False``), HF names ``block_sparse_moe.experts.{e}.w1/w3/w2`` = gate/up/down.

Refused: a sliding window (full causal attention here), and ``router_jitter_noise > 0``: megatron-core's
input jitter (``moe_input_jitter_eps``) multiplies the router input by noise in evaluation too, while HF
applies it only in training, so the converted model would not compute what HF computes.
"""

from megatron_patch.models.family import Family, ModelConfigError, register
from megatron_patch.models.mapping import decoder, moe_mlp


def validate(cfg: dict) -> None:
    if cfg.get("sliding_window"):
        raise ModelConfigError("sliding-window attention (Mixtral 'sliding_window') is not supported")
    jitter = cfg.get("router_jitter_noise") or 0.0
    if jitter:
        raise ModelConfigError(f"router_jitter_noise={jitter} is not supported: megatron-core's input jitter also "
                               "applies outside training (HF's only in training), so outputs would differ; "
                               "set it to 0")
    if not cfg.get("num_local_experts") or cfg.get("num_experts_per_tok") is None:
        raise ModelConfigError("a Mixtral config needs 'num_local_experts' and 'num_experts_per_tok'")


def weights(args):
    return decoder(args, moe_mlp(mlp="block_sparse_moe.", names=("w1", "w3", "w2")))


register(Family(name="mixtral", architectures=("MixtralForCausalLM",), model_type="mixtral", weights=weights,
                validate=validate,
                # Mixtral's experts use intermediate_size; the field table reads moe_intermediate_size.
                translate=lambda cfg: {"moe_ffn_hidden_size": cfg["intermediate_size"]},
                hf_extra=lambda a: {"sliding_window": None, "router_jitter_noise": 0.0,
                                    "num_local_experts": a.num_experts}))
