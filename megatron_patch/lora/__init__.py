"""LoRA adapters on megatron-core models, correct under TP, SP, PP, VPP, EP and expert-TP.

- ``config.py``   ``LoraConfig`` (rank, alpha, dropout, megatron target names) and its checkpoint args.
- ``layers.py``   ``LoraAdapter``: the low-rank branch of one column/row-parallel linear, its split and
                  communication; attached as the linear's ``adapter`` child with a forward hook.
- ``apply.py``    ``apply_lora`` (adapters on, base frozen, layout-independent init), ``merge_lora``,
                  adapter state dicts, ``load_adapters`` from any tensor source.
- ``mapping.py``  adapter tensors as mappings derived from the family weight tables (both directions, every
                  layout), ``MergedSource`` for the merged export.
- ``hf_peft.py``  HF PEFT adapter directories: ``write_peft`` and ``PeftSource``.

Only ``config`` is imported here; the rest is imported on use (``layers`` and ``apply`` need megatron-core).
"""

from megatron_patch.lora.config import ALL, TARGETS, LoraConfig, LoraError, from_args  # noqa: F401
