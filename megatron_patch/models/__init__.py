"""Model families (registry keyed by HF architectures), config translation and the GPTModel builder."""
