"""Integrations with other trainers (Megatron-LM)."""
