"""Tokenizer transplantation, SmolLM2-135M-Instruct (base) <- Gemma 3 270M's tokenizer (donor):
tether's OMP against mergekit-tokensurgeon's OMP (same k), and mean / zero initialisation.

Stages, in one run (each model directory is cached under
``$TETHER_CACHE_DIR/bench/transplant/<method>`` and reused only while its content key holds:
a hash of the method, k, the two models, the source of the code that builds it (tether's
transplant, OMP, vocabulary and model modules) and the versions it runs on, mergekit's for
mergekit; any change rebuilds it; ``--force`` redoes regardless):

1. speed on the same subset of new tokens: mergekit-tokensurgeon (in its own environment,
   bench/.envs/mergekit, batches of 512) runs until it has finished ``--subset-batches``
   batches past its first; its steady-state seconds per token is the time between the first
   and the last of those batches over their tokens. tether's solver approximates the same
   number of new tokens (the first ones, in its default batches of 2,048); its seconds per
   token is its batch time (laying out the anchors, a one-off set-up, reported apart). Both on this CPU, one
   after the other. On the same tokens, tether's solver is also run with float32 selection
   (the exact greedy choice): the overlap of the atoms chosen and both reconstruction errors
   are reported.
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
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import DATA_NOTE, shared_data

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MERGEKIT = ROOT / "bench" / ".envs" / "mergekit" / "bin"
BATCH = 512  # mergekit's batches
TETHER_BATCH = 2048  # tether's default (transplant's batch_size)


def cache_dir() -> Path:
    base = Path(os.environ.get("TETHER_CACHE_DIR", Path.home() / ".cache" / "tether"))
    return base / "bench" / "transplant"


def content_key(method: str, base: str, donor: str, k: int) -> str:
    """What a cached model directory depends on (module docstring), hashed."""
    import hashlib

    from common import versions

    h = hashlib.sha256(json.dumps([method, k]).encode())
    for model in (base, donor):
        for name in ("config.json", "tether-model.json"):
            path = Path(model) / name
            h.update(path.read_bytes() if path.exists() else name.encode())
    if method == "mergekit-omp":
        out = subprocess.run([str(MERGEKIT / "python"), "-c", "import importlib.metadata as m;"
                              "print(m.version('mergekit'), m.version('torch'))"],
                             capture_output=True, text=True, check=True)
        h.update(out.stdout.encode())
    else:
        for source in ("alignment/transplant.py", "alignment/omp.py", "constraints/vocab.py",
                       "models.py"):
            h.update((ROOT / "tether" / source).read_bytes())
        h.update(json.dumps(versions("torch", "transformers", "tokenizers",
                                     "llguidance")).encode())
    return h.hexdigest()[:16]


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


def subset_problem(base: str, donor: str, tokens: int):
    """(donor rows of the first ``tokens`` new tokens, unit-norm anchors): exactly what
    ``transplant`` hands to the solver for the input embeddings."""
    import torch

    from tether.alignment.transplant import (EMBED_NAMES, _load_tensor, anchor_pairs,
                                             match_vocabularies)
    from tether.constraints import vocab_for

    base_vocab, donor_vocab = vocab_for(base), vocab_for(donor)
    shared, _, new = match_vocabularies(base_vocab, donor_vocab)
    anchors = anchor_pairs(shared, base_vocab, donor_vocab)
    rows = _load_tensor(Path(donor), EMBED_NAMES)[1].to(torch.float32)
    atoms = rows[torch.tensor(list(anchors))]
    atoms = atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return rows[torch.tensor(new[:tokens])], atoms


def tether_rate(base: str, donor: str, k: int, tokens: int) -> dict:
    """Seconds per new token of tether's OMP (bfloat16 selection, as ``transplant`` runs it,
    in its batches) on the first ``tokens`` new tokens; and, on the same tokens, the atoms
    chosen by float32 selection (the exact greedy choice): overlap and reconstruction errors."""
    import torch

    from tether.alignment.omp import batch_omp, prepare

    targets, atoms = subset_problem(base, donor, tokens)
    batch_omp(targets[:16], atoms, 2)  # compile the CPU kernel (cached on disk by numba)
    t0 = time.perf_counter()
    prepared = {select: prepare(atoms, select) for select in (torch.bfloat16, torch.float32)}
    setup = time.perf_counter() - t0

    def solve(select):
        chosen, errors = [], []
        t0 = time.perf_counter()
        for start in range(0, len(targets), TETHER_BATCH):
            x = targets[start:start + TETHER_BATCH]
            idx, coef = batch_omp(x, atoms, k, select_dtype=select, prepared=prepared[select])
            recon = torch.einsum("bk,bkd->bd", coef, atoms[idx])
            errors.append((recon - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-12))
            chosen.append(idx)
        return time.perf_counter() - t0, torch.cat(chosen), torch.cat(errors)

    seconds, fast, err_fast = solve(torch.bfloat16)
    exact_seconds, exact, err_exact = solve(torch.float32)
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(fast, exact))
    return {"tokens": tokens, "seconds": seconds, "setup_s": setup,
            "s_per_token": seconds / tokens, "mean_relative_error": float(err_fast.mean()),
            "exact_selection": {"seconds": exact_seconds,
                                "mean_relative_error": float(err_exact.mean())},
            "atom_overlap": overlap / exact.numel()}


def full_run(method: str, base: str, donor: str, k: int, out: Path, force: bool) -> dict:
    """A full transplant by one method (cached under its content key), with its wall time and
    peak memory."""
    record = out.with_name(out.name + ".run.json")
    key = content_key(method, base, donor, k)
    if out.exists() and record.exists() and not force:
        cached = json.loads(record.read_text())
        if cached.get("content_key") == key:
            return cached
        print(f"{method}: cached output is stale (content key changed): rebuilding", flush=True)
    if out.exists():
        shutil.rmtree(out)
    log = out.with_name(out.name + ".log")
    if method == "mergekit-omp":
        cmd = [str(MERGEKIT / "mergekit-tokensurgeon"), base, donor, str(out), "-k", str(k),
               "--approximation-method", "omp", "--batch-size", str(BATCH)]
    else:
        cmd = [str(ROOT / ".venv" / "bin" / "tether"), "transplant", base, donor, str(out),
               "-k", str(k), "--method", method.removeprefix("tether-"), "--quiet"]
    result = timed_run(cmd, log)
    result["content_key"] = key
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
    ap = argparse.ArgumentParser(description=__doc__, epilog=DATA_NOTE,
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
        # the CPU torch first (a bare requirement would fetch a CUDA build of several GB)
        subprocess.run([str(MERGEKIT / "python"), "-m", "pip", "install", "torch==2.13.0"],
                       check=True)
        subprocess.run([str(MERGEKIT / "python"), "-m", "pip", "install", "mergekit==0.1.5"],
                       check=True)
    if not (MERGEKIT / "mergekit-tokensurgeon").exists():
        raise SystemExit("mergekit is not installed; run with --setup-mergekit")

    from tether.models import resolve

    base, donor = resolve(args.base), resolve(args.donor)
    work = cache_dir()
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    from common import versions

    mergekit_version = subprocess.run(
        [str(MERGEKIT / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True, text=True, check=True).stdout.strip()
    results = {"config": {"base": args.base, "donor": args.donor, "k": args.k,
                          "eval_bytes": args.eval_bytes, "mergekit_batch": BATCH,
                          "tether_batch": TETHER_BATCH},
               "versions": dict(versions("torch", "transformers", "numba"),
                                mergekit=mergekit_version)}
    print("versions:", json.dumps(results["versions"]), flush=True)

    if not args.skip_speed:
        mk = mergekit_rate(base, donor, args.k, args.subset_batches, work)
        print("mergekit", json.dumps(mk), flush=True)
        tt = tether_rate(base, donor, args.k, mk["tokens"])
        print("tether", json.dumps(tt), flush=True)
        results["speed"] = {"mergekit": mk, "tether": tt,
                            "speedup": mk["s_per_token"] / tt["s_per_token"]}

    methods = ["tether-omp", "mean", "zero"] + (["mergekit-omp"] if args.full_mergekit else [])
    if (work / "mergekit-omp.run.json").exists() and "mergekit-omp" not in methods:
        methods.append("mergekit-omp")  # a cached full run counts, if its key still holds
    runs = results.setdefault("full", {})
    for method in methods:
        runs[method] = full_run(method, base, donor, args.k, work / method, args.force)
        print(method, json.dumps({k: v for k, v in runs[method].items() if k != "report"}),
              flush=True)

    text = shared_data("wikitext-2", "valid.txt").read_text(encoding="utf-8")[:args.eval_bytes]
    bpb = results.setdefault("bits_per_byte", {})
    bpb["original SmolLM2"] = bits_per_byte(base, text)
    for method in ("tether-omp", "mergekit-omp", "mean", "zero"):
        if method in runs and (work / method / "config.json").exists():
            bpb[method] = bits_per_byte(str(work / method), text)
    if "tether-omp" in bpb and "mergekit-omp" in bpb:  # both models present
        results["rows_tether_vs_mergekit"] = rows_agreement(work)
    # results name models, not this machine's paths
    text_out = json.dumps(results, indent=1).replace(base, args.base).replace(donor, args.donor)
    out_path.write_text(text_out.replace(str(work), "$TETHER_CACHE_DIR/bench/transplant"))

    if "speed" in results:
        s = results["speed"]
        print(f"speed: tether {s['tether']['s_per_token'] * 1e3:.2f} ms/token, mergekit "
              f"{s['mergekit']['s_per_token'] * 1e3:.1f} ms/token: {s['speedup']:.2f}x; atoms "
              f"shared with float32 selection {s['tether']['atom_overlap']:.1%}; relative error "
              f"{s['tether']['mean_relative_error']:.4f} (float32 selection "
              f"{s['tether']['exact_selection']['mean_relative_error']:.4f})")
    print("| model | wall | peak memory | bits per byte |")
    print("|---|---|---|---|")
    for name, r in bpb.items():
        run = runs.get(name, {})
        wall = f"{run['wall_s'] / 60:.1f} min" if run else "-"
        mem = f"{run['peak_rss_mib'] / 1024:.1f} GiB" if run else "-"
        print(f"| {name} | {wall} | {mem} | {r['bits_per_byte']:.3f} |")


if __name__ == "__main__":
    main()
