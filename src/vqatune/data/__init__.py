"""Data: Kvasir-VQA facts, the synthetic stand-in, sources and the prepare step."""
