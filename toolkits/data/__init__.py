"""Data tools: ``python -m toolkits.data.preprocess`` turns JSONL text into Megatron indexed datasets."""
