"""HF <-> Megatron checkpoint conversion: ``python -m toolkits.checkpoint {hf2mcore,mcore2hf,mcore2mcore}``.

The functions behind the commands are importable: ``convert.hf2mcore / mcore2hf / mcore2mcore`` and
``verify.verify_checkpoint``.
"""
