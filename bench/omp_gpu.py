"""tether's OMP on a GPU at the real transplant's shapes (SmolLM2 <- Gemma 3: 46,018 anchors of
dimension 640, 215,993 new tokens, k=64), on random unit vectors: the cost depends on the
shapes only. Checks that the GPU's atoms and coefficients match the CPU's on a sample, then
times the full fit. The model files do not travel to a GPU machine here, hence random data.

    python bench/omp_gpu.py [--targets 215993] [--batch 2048] [--out bench/results/omp_gpu.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from tether.alignment.omp import batch_omp, prepare

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", type=int, default=46018)
    ap.add_argument("--dim", type=int, default=640)
    ap.add_argument("--targets", type=int, default=215993)
    ap.add_argument("-k", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/omp_gpu.py needs a CUDA GPU")
    g = torch.Generator().manual_seed(0)
    D = torch.nn.functional.normalize(torch.randn(args.anchors, args.dim, generator=g), dim=1)
    sample = torch.randn(32, args.dim, generator=g)
    # agreement with the CPU on a sample (the CPU keeps its Gram matrix in bfloat16)
    i_cpu, c_cpu = batch_omp(sample, D, args.k)
    Dg = D.cuda()
    t0 = time.perf_counter()
    prepared = prepare(Dg)
    torch.cuda.synchronize()
    setup = time.perf_counter() - t0
    i_gpu, c_gpu = batch_omp(sample.cuda(), Dg, args.k, prepared=prepared)
    same_atoms = float((i_gpu.cpu().sort(1).values == i_cpu.sort(1).values).float().mean())
    err = lambda i, c: float(((torch.einsum("bk,bkd->bd", c.cpu(), D[i.cpu()]) - sample).norm(
        dim=1) / sample.norm(dim=1)).mean())  # noqa: E731
    row = {"config": {k: v for k, v in vars(args).items() if k != "out"},
           "device": torch.cuda.get_device_name(), "setup_s": setup,
           "sample_same_atoms": same_atoms, "sample_error_cpu": err(i_cpu, c_cpu),
           "sample_error_gpu": err(i_gpu, c_gpu)}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for start in range(0, args.targets, args.batch):
        n = min(args.batch, args.targets - start)
        x = torch.randn(n, args.dim, device="cuda")
        batch_omp(x, Dg, args.k, prepared=prepared)
    torch.cuda.synchronize()
    row["fit_s"] = time.perf_counter() - t0
    row["ms_per_token"] = row["fit_s"] / args.targets * 1e3
    print(json.dumps(row, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
