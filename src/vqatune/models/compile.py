"""``torch.compile`` for training (whole transformer layers) and generation (RMSNorms), and a
``gc.freeze`` after the first step: levers that change no number the model computes, only how
fast its kernels are launched (each measured in benchmarks/).
"""
from __future__ import annotations

import functools

import torch


def compile_layers(model, *, dynamic: bool = True, towers: tuple[str, ...] = ("DecoderLayer", "EncoderLayer")) -> int:
    """``torch.compile`` each transformer layer in place (regional compilation); ``towers``: class
    name endings of the layers to compile (Gemma3DecoderLayer: language model; SiglipEncoderLayer:
    vision tower).

    A training step of MedGemma-4B at batch 16 is CPU-bound on an H100: ~10,000 small kernels
    launched one by one from Python (eager RMSNorm, rotary, GeLU, LoRA, bitsandbytes' 4-bit
    matmuls), more CPU time than the GPU needs for the work (benchmarks/profile_train.py). A
    compiled layer fuses the elementwise work and runs from generated code. All layers of a
    tower share one code object, so one compilation serves them all (torch >= 2.5 inlines the
    modules); ``dynamic`` avoids a recompilation per padded sequence length. The function is
    unchanged (tests/test_speed.py compares losses). Returns the number of layers compiled.
    """
    return _compile_modules(model, towers, dynamic)


def compile_wanted(setting: bool | None, device: str) -> bool:
    """``train.compile`` / ``evaluate.compile``: true, false, or None = on with a CUDA device."""
    return setting if setting is not None else str(device).startswith("cuda")


def _compile_modules(model, class_suffixes: tuple[str, ...], dynamic: bool) -> int:
    import torch._dynamo

    # A speed lever must not stop a training or an evaluation: where compiling fails (e.g. no C
    # compiler for triton's launcher), torch runs the module eagerly and logs why.
    torch._dynamo.config.suppress_errors = True
    # Under DDP, Dynamo's DDPOptimizer cuts every graph it compiles at DDP's bucket sizes (the
    # first bucket: 1 MiB) so that an all-reduce can start inside that graph's backward. With
    # the graphs already one layer each, that only cut each MedGemma layer in two, inside its
    # MLP (between gate_proj's lora_A and lora_B: 1.1 MiB of bf16 LoRA weights behind it), on
    # every process and not on one GPU; DDP's own hooks still all-reduce each layer's gradients
    # as its backward ends. tests/test_distributed.py checks the layers are compiled whole.
    torch._dynamo.config.optimize_ddp = False
    compiled = 0
    for module in model.modules():
        if type(module).__name__.endswith(class_suffixes) and hasattr(module, "compile"):
            module.compile(dynamic=dynamic)
            # nn.Module.compile stores the compiled call there (torch >= 2.2); the wrapper runs
            # before it, outside the graph. Without that attribute the layer stays as compiled.
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = _mask_without_base(module._compiled_call_impl)
            compiled += 1
    return compiled


def _mask_without_base(compiled):
    """Call ``compiled`` with an ``attention_mask`` that is not a view.

    Gemma 3's decoder layers get their mask as a view of a larger tensor (an unsqueezed [b, q, k]
    for one layer type, a sliced [b, 1, q, k] for the other), and Dynamo guards on the view's
    base: its layout differs between the two, so the shared graph compiled twice more, the last
    time steps into training (a stall on two H100s, each DDP process at its own step:
    benchmarks/results/ddp_bench_h100x2_defaults.md). A copy of the mask (b x q x k booleans,
    ~3 MB at 32 x 300 tokens) has no base to guard on. Outside the compiled region on purpose.
    """
    @functools.wraps(compiled)
    def call(*args, **kwargs):
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask._base is not None:
            kwargs["attention_mask"] = mask.clone()
        return compiled(*args, **kwargs)

    return call


def freeze_gc_after_warmup():
    """Trainer callback: after the first optimizer step, ``gc.freeze()`` what is alive then.

    Loading the model and compiling its layers leave millions of long-lived Python objects
    (graphs, guards, sympy expressions). Python's full collection walks all of them once the
    young generations have promoted enough new ones, a pause of seconds in the middle of the
    steps (~2 M small objects: 3.3 s on the dev box). Frozen objects are skipped by every later
    collection; cyclic garbage frozen with them lives until training ends (``on_train_end``
    unfreezes). Nothing in the standard library or transformers does this for a Trainer.
    """
    import gc

    from transformers import TrainerCallback

    class _FreezeGc(TrainerCallback):
        def __init__(self):
            self.frozen = False

        def on_step_end(self, args, state, control, **kwargs):
            if not self.frozen:
                gc.freeze()
                self.frozen = True

        def on_train_end(self, args, state, control, **kwargs):
            if self.frozen:
                gc.unfreeze()
                self.frozen = False

    return _FreezeGc()


def compile_norms(model, *, dynamic: bool = True) -> int:
    """``torch.compile`` every RMSNorm of ``model`` in place, for generation.

    Decoding MedGemma-4B is CPU-bound on an H100: in a profiled batch of 192 (prefill + 7 steps)
    the GPU was busy 2.3 s of 7.2 s, a decoding step taking ~190 ms (benchmarks/
    profile_generate.py). Gemma's RMSNorm is ten small operations (fp32 cast, pow, mean, add,
    rsqrt, mul, weight cast, add, mul, cast) and runs 6 times per layer: about half of a step's
    operations. Compiled, each is one fused kernel (1.29x for the six configurations). Whole
    layers cannot be compiled for generation: the KV cache's per-layer state makes every layer a
    new graph (past the recompile limit). Returns the number compiled.
    """
    import torch._dynamo

    # Variants: hidden size and head size (q/k norms), prefill and one-token decoding.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    return _compile_modules(model, ("RMSNorm",), dynamic)
