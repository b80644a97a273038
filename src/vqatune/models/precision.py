"""Which dtype each part of the model computes in, for training and for generation.

Every function here computes the same function as the plain Hugging Face path, cheaper:

- ``prepare_for_kbit_training``: what ``peft.prepare_model_for_kbit_training`` does, without its
  upcast of every non-quantized weight to fp32 (embeddings, norms, an unquantized vision tower):
  the upcast alone takes the guide's recipe to ~40 GiB for one example on an H100. Gemma's
  RMSNorm already computes in fp32 internally; the fp32 residual stream the upcast bought is kept
  (``keep_residual_stream_fp32``). ``freeze_for_kbit_training`` is the benchmarks' variant.
- ``adapters_in_compute_dtype``: LoRA weights in the base's compute dtype for generation (peft
  loads them in float32, which doubled the tuned model's generation time).
- ``dequantize_for_generation``: nf4 weights dequantized once to bf16. For more than one row
  bitsandbytes dequantizes to bf16 and calls the same matmul at every step, so the function
  is unchanged while each decode step stops paying the dequantization.
"""
from __future__ import annotations

import torch


def prepare_for_kbit_training(model, gradient_checkpointing: bool = True, *, fp32_residual: bool = True):
    """What training a (quantized) base model needs, without peft's fp32 upcast of the weights.

    peft's ``prepare_model_for_kbit_training`` casts every non-quantized weight (embeddings,
    norms, the vision tower) to fp32: on an H100 the guide's recipe peaks at ~40 GiB for one
    example (27 GiB at batch 4 without it). Here the base stays frozen in its loaded dtype.
    What the upcast did buy, an fp32 residual stream, is kept with
    ``fp32_residual`` (see ``keep_residual_stream_fp32``). Also: no KV cache, and with gradient
    checkpointing, inputs that require grad so the checkpointed blocks of a fully frozen model
    still backpropagate into the adapters.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    model.config.use_cache = False
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant checkpointing: the reentrant kind drops grads when no input needs them.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if fp32_residual:
        keep_residual_stream_fp32(model)
    return model


def keep_residual_stream_fp32(model):
    """Run the language model's residual stream in fp32; the weights keep their dtype.

    The token embeddings' output is cast to fp32, so the image features merged into it, every
    residual sum and each Gemma RMSNorm's output (``type_as`` its input) are fp32; matmuls stay
    bf16 under autocast, and bitsandbytes casts each 4-bit layer's output back to its input's
    dtype, so peft adds a LoRA update to an fp32 value. In a bf16 stream an update smaller than
    half a bf16 step of that value (~0.004 at magnitude 1) is rounded away, which is what
    AdamW's first steps from a zero LoRA B are at lr 2e-4 (about 2/3 of the change survived on
    CPU). This is what peft's fp32 upcast of norms and embeddings gave the guide, without fp32
    weights. Returns the hook handle, or None when the embeddings are fp32 already.
    (With ``quantization: none`` the base linear's output is bf16 under autocast, so the LoRA
    sum itself stays bf16; only the residual stream is fp32 there.)
    """
    import torch

    embeddings = model.get_input_embeddings()
    if embeddings.weight.dtype == torch.float32:
        return None
    return embeddings.register_forward_hook(_output_in_fp32)


def _output_in_fp32(module, args, output):
    return output.float()


def freeze_for_kbit_training(model, *, upcast_to_fp32: bool = False,
                             gradient_checkpointing: bool = True):
    """Freeze the base weights and turn on gradient checkpointing for (Q)LoRA training.

    ``upcast_to_fp32=True`` is the guide's ``prepare_model_for_kbit_training`` (kept for the
    benchmark's baseline and for users who want it); the default keeps bf16 weights bf16.
    """
    if upcast_to_fp32:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no requires-grad hook on the input embeddings.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def dequantize_for_generation(model, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every bitsandbytes 4-bit linear layer by a plain linear layer of its weights.

    LoRA layers keep working (PEFT calls ``base_layer(x)`` and adds the adapter), and
    ``disable_adapter()`` still gives the base model: no second copy of the weights. Returns
    the number of layers replaced. A no-op on a model without 4-bit layers.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import dequantize_4bit
    except ImportError:
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype)
            linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                     device=weight.device, dtype=dtype)
            linear.weight.data = weight.reshape(child.out_features, child.in_features)
            linear.weight.requires_grad_(False)
            if child.bias is not None:
                linear.bias.data = child.bias.data.to(dtype)
                linear.bias.requires_grad_(False)
            setattr(parent, name, linear)
            replaced += 1
    if replaced and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return replaced


def adapters_in_compute_dtype(model) -> int:
    """Cast the LoRA weights of a loaded ``PeftModel`` to the dtype the base model computes in.

    peft loads adapters in float32 (``autocast_adapter_dtype``), so on a bf16 (or nf4 with bf16
    compute) base every LoRA layer casts its input to float32, runs two float32 matmuls and
    casts back. For generation that doubled the time of the tuned configurations on an H100
    (benchmarks/profile_generate.py: 6.6 s against 3.2 s per batch of 192 with the adapter off).
    Training keeps float32 adapters (small updates); a float32 base (the tiny model on CPU) is
    left as it is. Returns the number of tensors cast.
    """
    dtype = model.get_input_embeddings().weight.dtype
    if not dtype.is_floating_point:
        return 0
    cast = 0
    for name, param in model.named_parameters():
        if "lora_" in name and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast
