"""Does a GPU run slower when its neighbour is busy? One GPU alone vs two at once, no DDP.

ddp_bench.py found each DDP process ~12% slower per micro-batch than one GPU running the same
micro-batches alone, at 64 and at 96 rows per GPU (GPU-bound on both sides: one GPU's examples/s
hardly moved from 64 to 96 rows). This separates the machine from the software: the same
kernels (a bf16 matmul and a device-memory copy, the two kinds a QLoRA step is made of) run for a
fixed time on GPU 0 alone, then on both GPUs at once in two processes with nothing shared; the
SM clock and power of each GPU are read while they run. Last, an all-reduce of a LoRA-sized
gradient (42 MB of bf16, the MLP adapters of MedGemma-4B at r=16) times the link DDP uses.

    python benchmarks/gpu_pair_check.py --out $OUT   # on a two-GPU machine

Writes ``gpu_pair_check.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SECONDS = 12


def smi() -> list[dict]:
    fields = "index,clocks.sm,power.draw,temperature.gpu,utilization.gpu"
    text = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, check=True).stdout
    return [dict(zip(fields.split(","), (v.strip() for v in line.split(",")))) for line in text.strip().splitlines()]


def load(gpu: int, seconds: float, result: Path) -> None:
    """Matmuls then copies on ``gpu`` for ``seconds`` each; TFLOP/s and GB/s to ``result``."""
    import torch

    torch.cuda.set_device(gpu)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    src = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    out = {}
    for name, op, amount in (("matmul_tflops", lambda: a @ b, 2 * 8192 ** 3 / 1e12),
                             ("copy_gbps", lambda: dst.copy_(src), 2 * src.numel() / 1e9)):
        for _ in range(5):
            op()
        torch.cuda.synchronize()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(20):
                op()
            n += 20
            torch.cuda.synchronize()
        out[name] = round(n * amount / (time.perf_counter() - start), 1)
    result.write_text(json.dumps(out))


def run_loads(gpus: list[int], out: Path) -> dict:
    procs = [subprocess.Popen([sys.executable, __file__, "_load", "--gpu", str(g), "--out", str(out)]) for g in gpus]
    time.sleep(SECONDS / 2)
    during_matmul = smi()
    time.sleep(SECONDS)
    during_copy = smi()
    if any(p.wait() for p in procs):
        raise SystemExit("a load process failed")
    return {"gpus": gpus, "per_gpu": {g: json.loads((out / f"load_{g}.json").read_text()) for g in gpus},
            "smi_during_matmul": during_matmul, "smi_during_copy": during_copy}


def allreduce(rank: int, world: int, result: Path) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    grad = torch.randn(21_000_000, device="cuda", dtype=torch.bfloat16)  # 42 MB
    for _ in range(10):
        dist.all_reduce(grad)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        dist.all_reduce(grad)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / 50 * 1e3
    if rank == 0:
        result.write_text(json.dumps({"all_reduce_42MB_ms": round(ms, 3),
                                      "bus_gbps": round(2 * (world - 1) / world * grad.numel() * 2 / ms / 1e6, 1)}))
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "_load", "_allreduce"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--rank", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.mode == "_load":
        load(args.gpu, SECONDS, out / f"load_{args.gpu}.json")
        return 0
    if args.mode == "_allreduce":
        allreduce(args.rank, 2, out / "allreduce.json")
        return 0
    import torch

    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
               "topology": subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout,
               "idle": smi(), "alone": run_loads([0], out), "together": run_loads([0, 1], out)}
    procs = [subprocess.Popen([sys.executable, __file__, "_allreduce", "--rank", str(r), "--out", str(out)])
             for r in range(2)]
    if not any(p.wait() for p in procs):
        results["allreduce"] = json.loads((out / "allreduce.json").read_text())
    alone = results["alone"]["per_gpu"][0]
    for g, r in results["together"]["per_gpu"].items():
        for k in r:
            results.setdefault("together_vs_alone", {})[f"gpu{g}_{k}"] = round(r[k] / alone[k], 3)
    text = json.dumps(results, indent=2)
    (out / "gpu_pair_check.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
