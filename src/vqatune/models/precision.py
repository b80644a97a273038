"""Which dtype each part of the model computes in, for training and for generation.

Every function here computes the same function as the plain Hugging Face path, cheaper:

- ``prepare_for_kbit_training``: what ``peft.prepare_model_for_kbit_training`` does, without its
  upcast of every non-quantized weight to fp32 (embeddings, norms, an unquantized vision tower):
  the upcast alone takes the guide's recipe to ~40 GiB for one example on an H100. Gemma's
  RMSNorm already computes in fp32 internally; the fp32 residual stream the upcast bought is kept
  (``keep_residual_stream_fp32``). ``freeze_for_kbit_training`` is the benchmarks' variant.
- ``adapters_in_compute_dtype``: LoRA weights in the base's compute dtype for generation (peft
  loads them in float32, which doubled the tuned model's generation time).
- ``dequantize_4bit_layers`` (``train.dequantize_base``; ``dequantize_for_generation``): nf4
  weights dequantized once to the compute dtype. For more than one row bitsandbytes
  dequantizes to that dtype and calls the same matmul at every call, so the function is
  unchanged (QLoRA's nf4-rounded weights) while no GEMM pays the dequantization any more.
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


class DequantizedLinear(torch.nn.Linear):
    """A bitsandbytes 4-bit linear layer's weights, dequantized once: the nf4-rounded values.

    ``forward`` computes what ``bnb.nn.Linear4bit.forward`` computes (dequantize to the compute
    dtype, ``linear``, the output cast back to the input's dtype) without dequantizing at every
    call. The cast back matters for training: with ``train.fp32_residual`` the input is fp32
    and peft adds each LoRA update to the base layer's fp32 output, as it does on the 4-bit
    layer. A subclass of ``nn.Linear``, so peft wraps it as it wraps any linear layer.
    """

    def forward(self, x):
        out = torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias)
        return out.to(x.dtype)


def dequantized_bytes(model, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes the 4-bit layers of ``model`` take once dequantized to ``dtype`` (0 without any)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    size = torch.empty((), dtype=dtype).element_size()
    return sum(m.in_features * m.out_features * size for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


# Free GPU memory that must remain after dequantizing for ``train.dequantize_base: auto`` to turn
# it on: MedGemma-4B training at 32 rows peaks ~8 GiB above its weights (benchmarks/results/).
DEQUANTIZE_HEADROOM_GIB = 12.0


def dequantize_wanted(setting, model) -> tuple[bool, str]:
    """``train.dequantize_base``: (dequantize?, why). auto = on with CUDA when the card's free
    memory keeps ``DEQUANTIZE_HEADROOM_GIB`` after the bf16 copies; off on CPU (bitsandbytes'
    CPU path already dequantizes per call, and the embedded run gains nothing)."""
    extra = dequantized_bytes(model)
    if not extra:
        return False, "no 4-bit layers"
    if setting is True or setting is False:
        return setting, "train.dequantize_base"
    device = model.get_input_embeddings().weight.device
    if device.type != "cuda":
        return False, "auto: not on CUDA"
    free, _ = torch.cuda.mem_get_info(device)
    left = (free - extra) / 2**30
    if left < DEQUANTIZE_HEADROOM_GIB:
        return False, f"auto: {left:.1f} GiB would be left free (< {DEQUANTIZE_HEADROOM_GIB})"
    return True, f"auto: {left:.1f} GiB left free after {extra / 2**30:.1f} GiB of bf16 weights"


def dequantize_4bit_layers(model, dtype: torch.dtype | None = None) -> int:
    """Replace every bitsandbytes 4-bit linear layer by a ``DequantizedLinear`` of its weights.

    The weights are exactly what bitsandbytes multiplies with at every call (its
    ``dequantize_4bit`` of the packed nf4 values, double quantization included, in the layer's
    compute dtype unless ``dtype`` is given): QLoRA's numerics, without the per-call
    dequantization. Call it before peft wraps the model (training) or after (generation): LoRA
    layers keep working (peft calls ``base_layer(x)`` and adds the adapter), and
    ``disable_adapter()`` still gives the base model. Returns the number of layers replaced;
    a no-op on a model without 4-bit layers.
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
            target = dtype or child.compute_dtype or torch.float32
            weight = dequantize_4bit(child.weight.data, child.weight.quant_state).to(target)
            linear = DequantizedLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                       device="meta", dtype=target)
            linear.weight = torch.nn.Parameter(weight.reshape(child.out_features, child.in_features),
                                               requires_grad=False)
            if child.bias is not None:
                linear.bias = torch.nn.Parameter(child.bias.data.to(target), requires_grad=False)
            setattr(parent, name, linear)
            del child
            replaced += 1
    if replaced and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return replaced


def dequantize_for_generation(model, dtype: torch.dtype = torch.bfloat16) -> int:
    """``dequantize_4bit_layers`` in ``dtype`` (bf16 by default), for generation."""
    return dequantize_4bit_layers(model, dtype)


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
