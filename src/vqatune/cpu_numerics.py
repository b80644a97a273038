"""One numeric path on every x86 CPU, so a run gives the same numbers on a colleague's machine.

Three things differ between x86 CPUs and would otherwise change results:

1. **bitsandbytes' 4-bit inference path.** On a CPU that reports AVX512-BF16, bitsandbytes 0.50
   repacks each ``Linear4bit`` weight on its first no-grad forward in eval mode
   (``_convert_weight_packed_for_cpu``) and from then on multiplies in bfloat16 with a fused
   kernel; elsewhere it dequantizes to the compute dtype and lets torch multiply. That fast path
   is wrong for us three ways: the repacking reshapes ``absmax`` to ``[out, in // blocksize]`` and
   fails on layers narrower than the 64-value block (the tiny model's); a packed layout read by
   the generic kernel (a CPU without the feature, or a weight moved by ``Params4bit.to()``,
   bitsandbytes issue #2078) gives silently wrong numbers; and it rounds activations to bf16, so
   the eval loss, the search objective and evaluation would no longer use the arithmetic that
   training (which always needs gradients, so never takes that path) uses. We switch it off on
   every 4-bit layer when the model is loaded: dequantize, then torch's matmul, on every CPU.
   It costs CPU inference speed on large models only; on a GPU the flag is never read.

2. **bitsandbytes' CPU quantization.** Loading a model in 4 bits quantizes each layer's weights
   to nf4 (in torch, the same everywhere) and then their per-block absmax to 8 bits (double
   quantization) with bitsandbytes' CPU library, which picks codes differently by CPU (on an AMD
   EPYC with AVX512-BF16, 0.15% of them differ from bitsandbytes' own CUDA and torch rule).
   ``use_portable_quantization`` puts that rule on the CPU too, in torch.

3. **torch's CPU kernels, chosen per CPU at run time.** ATen picks its vectorised kernels
   (softmax, norms, reductions, exp) by the best instruction set the CPU has (DEFAULT, AVX2,
   AVX512); oneDNN, which runs the vision tower's patch convolution, JIT-compiles for the CPU;
   MKL picks its GEMM code path. Each sums in another order or rounds another way, so an AVX512
   machine and an AVX2 one drift apart in the last bits from the first step and, over hundreds of
   steps, in answers. ``pin_cpu_numerics`` fixes all three to paths every x86-64 CPU runs alike:
   ATen's DEFAULT kernels, torch's own convolution instead of oneDNN, and MKL's conditional
   numerical reproducibility in COMPATIBLE mode. With one fixed thread count (``cpu_threads``)
   the embedded run is then the same bit for bit on any x86-64 CPU. Measured cost and the check a
   colleague runs: docs/reproducibility.md. It applies only when no CUDA device is present (GPU
   kernels differ by card anyway, and the host's fast kernels keep the GPU fed), and
   ``VQATUNE_CPU_NUMERICS=native`` turns it off.
"""
from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)

# What each pinned library reads, and the value every x86-64 CPU computes alike with.
PINNED_ENVIRONMENT = {
    # ATen reads it once, at its first dispatch of a vectorised kernel (importing transformers
    # already does one): it must be set before that.
    "ATEN_CPU_CAPABILITY": "default",
    # MKL reads it when it initialises; COMPATIBLE runs the same code path on every CPU.
    "MKL_CBWR": "COMPATIBLE",
}
SWITCH = "VQATUNE_CPU_NUMERICS"  # "native": the CPU's fastest kernels, last bits vary by CPU


def pin_cpu_numerics() -> bool:
    """Put this process on the numeric paths that every x86-64 CPU runs alike (see above).

    Call it before anything runs a torch kernel or imports transformers: ``vqatune/__init__``
    does, so every stage, the CLI and the tests get it by importing the package first. Returns
    whether it pinned: not with a CUDA device, not with VQATUNE_CPU_NUMERICS=native.
    Child processes (DDP, search workers) inherit the environment and pin again on import.
    """
    mode = os.environ.get(SWITCH, "portable")
    if mode not in ("portable", "native"):
        raise ValueError(f"{SWITCH}={mode!r}: use 'portable' (the default) or 'native'")
    if mode == "native":
        return False
    import torch

    if torch.cuda.is_available():
        return False
    # Set, not setdefault: the point is that the CPU (or an inherited variable) does not choose.
    os.environ.update(PINNED_ENVIRONMENT)
    # oneDNN JIT-compiles per CPU and has no bit-reproducible mode; torch's own convolution
    # (im2col + MKL GEMM) then falls under MKL_CBWR.
    torch.backends.mkldnn.enabled = False
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        # Something ran a torch kernel (or imported transformers or bitsandbytes) before vqatune:
        # ATen has fixed its kernels already, and this process computes like its CPU.
        log.warning("CPU numerics not pinned: import vqatune before torch runs anything (ATen "
                    "already chose %s); results may differ in the last bits on other CPUs",
                    torch.backends.cpu.get_cpu_capability())
        return False
    return True


def numerics_label() -> str:
    """How this process computes on the CPU, for the metrics' provenance: ``portable`` when
    pinned, else ``native (<ATen capability>)``, the CPU's own choice."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if (capability == "DEFAULT" and os.environ.get("MKL_CBWR") == PINNED_ENVIRONMENT["MKL_CBWR"]
            and not torch.backends.mkldnn.enabled):
        return "portable"
    return f"native ({capability})"


def portable_quantize_blockwise(A, code, blocksize: int):
    """bitsandbytes' blockwise 8-bit quantization, in torch: each value scaled by its block's
    absmax and given the nearest code, nearest by the midpoints between sorted codes.

    This is the rule of bitsandbytes' CUDA kernel and of its pure-torch ``default`` backend.
    Its CPU library (``cquantize_blockwise_cpu_fp32``) picks codes another way. That way is not
    the same on every CPU: on an AMD EPYC with AVX512-BF16, 0.15% of its codes differ from this
    rule. It is what quantizes the nf4 absmax of every 4-bit layer (double quantization) at load
    time, so a 4-bit model loaded on two CPUs differed before a single step ran. Written here
    because bitsandbytes offers no switch between its backends. Same signature and outputs as
    the op: (uint8 codes shaped like ``A``, fp32 absmax per block)."""
    import torch

    flat = A.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().max(dim=-1).values
    # times the reciprocal, as the CUDA kernel and the default backend scale (a division can
    # round the other way and, next to a midpoint, give the other code)
    scaled = torch.clamp(flat[:full].reshape(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)
    scaled = scaled.reshape(-1)
    if full < n:  # a last, shorter block (the default backend divides here)
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    midpoints = (code[:-1] + code[1:]) / 2  # bitsandbytes' codes are sorted
    return torch.bucketize(scaled, midpoints.to(scaled.device)).to(torch.uint8).reshape(A.shape), absmax


@functools.cache
def use_portable_quantization() -> bool:
    """Route bitsandbytes' CPU blockwise quantization to ``portable_quantize_blockwise``, once
    per process; before a 4-bit model is loaded on the CPU. Returns whether it is in place
    (False without bitsandbytes). CUDA keeps bitsandbytes' own kernel."""
    try:
        from bitsandbytes._ops import register_kernel
    except ImportError:
        return False
    register_kernel("bitsandbytes::quantize_blockwise", "cpu")(portable_quantize_blockwise)
    return True


def use_portable_4bit_path(model) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` on the dequantize-then-matmul path.

    Returns the number of 4-bit layers set. Call it on a freshly loaded model, before any forward.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers either
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            # The attribute bitsandbytes sets from has_avx512bf16() in Linear4bit.__init__ and
            # reads in forward(); tests/test_cpu_numerics.py fails if a new version renames it.
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
