"""Model families (registry keyed by HF architectures), their weight mappings, config translation and the GPTModel
builder."""
