"""Tokenizer transplantation, SmolLM2-135M-Instruct (base) <- Gemma 3 270M's tokenizer (donor):
tether's OMP against mergekit-tokensurgeon's OMP (same k), and mean / zero initialisation.

Stages, in one run (each model directory is cached under
``$TETHER_CACHE_DIR/bench/transplant/<method>`` and reused when complete; ``--force`` redoes):

1. speed on the same subset of new tokens: mergekit-tokensurgeon (in its own environment,
   bench/.envs/mergekit, batches of 512) runs until it has finished ``--subset-batches``
   batches past its first; its steady-state seconds per token is the time between the first
   and the last of those batches over their tokens. tether approximates the same number of new
   tokens (``limit_new``); its seconds per token is its batch time (the anchors' Gram matrix,
   a one-off set-up, reported apart). Both on this CPU, one after the other.
2. full transplants: tether OMP, mean, zero (and mergekit OMP with ``--full-mergekit``, about
   1.5 hours here); wall time and peak memory (``/usr/bin/time``).
3. bits per byte of every model present (and of the original SmolLM2) on the first
   ``--eval-bytes`` of ../shared/data/wikitext-2/valid.txt: windows of up to 1,024 tokens
   each led by the tokenizer's BOS (or EOS), total negative log-likelihood over the text's
   bytes, so that tokenizers compare fairly.

    .venv/bin/python bench/transplant.py [--setup-mergekit] [--full-mergekit]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
RESULTS = ROOT / "bench" / "results"
MERGEKIT = ROOT / "bench" / ".envs" / "mergekit" / "bin"
BATCH = 512


def cache_dir() -> Path:
    base = Path(os.environ.get("TETHER_CACHE_DIR", Path.home() / ".cache" / "tether"))
    return base / "bench" / "transplant"


def timed_run(cmd: list[str], log: Path) -> dict:
    """Run cmd under /usr/bin/time: wall seconds and peak resident memory (MiB)."""
    stats = log.with_suffix(".time")
    with open(log, "w") as fh:
        subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(stats), *cmd], check=True,
                       stdout=fh, stderr=subprocess.STDOUT)
    wall, rss_kb = stats.read_text().split()[-2:]
    return {"wall_s": float(wall), "peak_rss_mib": int(rss_kb) / 1024}


def mergekit_rate(base: str, donor: str, k: int, batches: int, work: Path) -> dict:
    """Steady-state seconds per new token of mergekit-tokensurgeon's OMP (module docstring)."""
    cmd = [str(MERGEKIT / "mergekit-tokensurgeon"), base, donor, str(work / "mergekit-subset"),
           "-k", str(k), "--approximation-method", "omp", "--batch-size", str(BATCH)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            bufsize=1)
    seen: dict[int, float] = {}
    pattern = re.compile(r"Approximating tokens:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")
    buf = ""
    try:
        while True:
            ch = proc.stderr.read(1)
            if not ch:
                raise RuntimeError("mergekit-tokensurgeon ended before the subset was timed")
            if ch not in "\r\n":
                buf += ch
                continue
            m = pattern.search(buf)
            buf = ""
            if m:
                done, total = int(m.group(1)), int(m.group(2))
                seen.setdefault(done, time.perf_counter())
                if done >= 1 + batches:
                    break
    finally:
        proc.kill()
        proc.wait()
    seconds = seen[1 + batches] - seen[1]
    return {"batches": batches, "tokens": batches * BATCH, "seconds": seconds,
            "s_per_token": seconds / (batches * BATCH), "total_batches": total}


def tether_rate(base: str, donor: str, k: int, tokens: int, work: Path) -> dict:
    from tether.alignment.transplant import transplant

    report = transplant(base, donor, work / "tether-subset", k=k, method="omp", device="cpu",
                        limit_new=tokens, progress=False)
    sec = report.seconds
    return {"tokens": tokens, "seconds": sec["omp_batches"], "setup_s": sec["omp_setup"],
            "s_per_token": sec["omp_batches"] / tokens,
            "mean_relative_error": report.mean_relative_error}


def full_run(method: str, base: str, donor: str, k: int, out: Path, force: bool) -> dict:
    """A full transplant by one method (cached), with its wall time and peak memory."""
    record = out.with_name(out.name + ".run.json")
    if out.exists() and record.exists() and not force:
        return json.loads(record.read_text())
    log = out.with_name(out.name + ".log")
    if method == "mergekit-omp":
        cmd = [str(MERGEKIT / "mergekit-tokensurgeon"), base, donor, str(out), "-k", str(k),
               "--approximation-method", "omp", "--batch-size", str(BATCH)]
    else:
        cmd = [str(ROOT / ".venv" / "bin" / "tether"), "transplant", base, donor, str(out),
               "-k", str(k), "--method", method.removeprefix("tether-"), "--quiet"]
    result = timed_run(cmd, log)
    report = out / "transplant_report.json"
    if report.exists():
        result["report"] = json.loads(report.read_text())
    record.write_text(json.dumps(result, indent=1))
    return result


def rows_agreement(work: Path) -> dict:
    """How close tether's and mergekit's approximated rows are (both OMP, k = 64): cosine and
    norm ratio per row, over the rows the two outputs do not share exactly (the copies)."""
    import torch
    from safetensors.torch import load_file

    def embed(model_dir: Path) -> torch.Tensor:
        tensors: dict = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        return tensors["model.embed_tokens.weight"].float()

    a, b = embed(work / "tether-omp"), embed(work / "mergekit-omp")
    same = (a == b).all(dim=1)
    cos = torch.nn.functional.cosine_similarity(a[~same], b[~same], dim=1)
    ratio = a[~same].norm(dim=1) / b[~same].norm(dim=1).clamp_min(1e-12)
    return {"identical_rows": int(same.sum()), "differing_rows": int((~same).sum()),
            "cosine_mean": float(cos.mean()), "cosine_median": float(cos.median()),
            "cosine_p10": float(cos.quantile(0.1)), "norm_ratio_mean": float(ratio.mean())}


def bits_per_byte(model_dir: str, text: str, window: int = 1024) -> dict:
    """Total NLL (bits) of ``text`` over its UTF-8 bytes, in windows led by BOS/EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lead = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = tok(text, add_special_tokens=False).input_ids
    nll = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), window - 1):
            chunk = ids[start:start + window - 1]
            x = torch.tensor([[lead] + chunk])
            logits = model(x).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
    n_bytes = len(text.encode("utf-8"))
    return {"tokens": len(ids), "bytes": n_bytes, "bits_per_byte": nll / math.log(2) / n_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2")
    ap.add_argument("--donor", default="gemma3")
    ap.add_argument("-k", type=int, default=64)
    ap.add_argument("--subset-batches", type=int, default=4,
                    help="mergekit batches of 512 timed (and as many new tokens for tether)")
    ap.add_argument("--full-mergekit", action="store_true",
                    help="also the full mergekit transplant (about 1.5 hours here)")
    ap.add_argument("--eval-bytes", type=int, default=200_000)
    ap.add_argument("--force", action="store_true", help="redo cached transplants")
    ap.add_argument("--setup-mergekit", action="store_true",
                    help="create bench/.envs/mergekit with mergekit 0.1.5, then run")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "transplant.json"))
    args = ap.parse_args()
    if args.setup_mergekit:
        subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT.parent)], check=True)
        subprocess.run([str(MERGEKIT / "python"), "-m", "pip", "install", "mergekit==0.1.5"],
                       check=True)
    if not (MERGEKIT / "mergekit-tokensurgeon").exists():
        raise SystemExit("mergekit is not installed; run with --setup-mergekit")

    from tether.models import resolve

    base, donor = resolve(args.base), resolve(args.donor)
    work = cache_dir()
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results["config"] = {"base": args.base, "donor": args.donor, "k": args.k,
                         "eval_bytes": args.eval_bytes, "batch": BATCH}

    if not args.skip_speed:
        mk = mergekit_rate(base, donor, args.k, args.subset_batches, work)
        print("mergekit", json.dumps(mk), flush=True)
        tt = tether_rate(base, donor, args.k, mk["tokens"], work)
        print("tether", json.dumps(tt), flush=True)
        results["speed"] = {"mergekit": mk, "tether": tt,
                            "speedup": mk["s_per_token"] / tt["s_per_token"]}

    methods = ["tether-omp", "mean", "zero"] + (["mergekit-omp"] if args.full_mergekit else [])
    runs = results.setdefault("full", {})
    for method in methods:
        runs[method] = full_run(method, base, donor, args.k, work / method, args.force)
        print(method, json.dumps({k: v for k, v in runs[method].items() if k != "report"}),
              flush=True)

    text = WIKITEXT.read_text(encoding="utf-8")[:args.eval_bytes]
    bpb = results.setdefault("bits_per_byte", {})
    bpb["original SmolLM2"] = bits_per_byte(base, text)
    for method in ("tether-omp", "mergekit-omp", "mean", "zero"):
        if (work / method / "config.json").exists() and (
                method != "mergekit-omp" or (work / f"{method}.run.json").exists()):
            bpb[method] = bits_per_byte(str(work / method), text)
    if "tether-omp" in bpb and "mergekit-omp" in bpb:
        results["rows_tether_vs_mergekit"] = rows_agreement(work)
    # results name models, not this machine's paths
    text_out = json.dumps(results, indent=1).replace(base, args.base).replace(donor, args.donor)
    out_path.write_text(text_out.replace(str(work), "$TETHER_CACHE_DIR/bench/transplant"))

    if "speed" in results:
        s = results["speed"]
        print(f"speed: tether {s['tether']['s_per_token'] * 1e3:.1f} ms/token, mergekit "
              f"{s['mergekit']['s_per_token'] * 1e3:.1f} ms/token: {s['speedup']:.2f}x")
    print("| model | wall | peak memory | bits per byte |")
    print("|---|---|---|---|")
    for name, r in bpb.items():
        run = runs.get(name, {})
        wall = f"{run['wall_s'] / 60:.1f} min" if run else "-"
        mem = f"{run['peak_rss_mib'] / 1024:.1f} GiB" if run else "-"
        print(f"| {name} | {wall} | {mem} | {r['bits_per_byte']:.3f} |")


if __name__ == "__main__":
    main()
