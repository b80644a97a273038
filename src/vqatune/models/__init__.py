"""Models: loading the base (optionally quantized) and a tuned one, LoRA, precision, compilation,
the builtin tiny Gemma 3 and the base_model stage's materialisation."""
