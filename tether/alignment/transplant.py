r"""Training-free tokenizer transplantation by orthogonal matching pursuit (OMP).

Goddard and Fernandes Neto (2025): give a pretrained base model the tokenizer of a donor
model. Tokens of the donor vocabulary are sorted into three kinds:

* shared: the donor token decodes to the same bytes as a base token (byte-level BPE's 'Ġ' and
  SentencePiece's '▁', ``<0xNN>`` byte tokens and the like all compare on their bytes); its
  base row is copied. Where a vocabulary spells the same bytes twice (``<0x5F>`` and ``_``),
  only the spelling its tokenizer produces is shared;
* special, matched by role (bos, eos, pad, unk, turn start and end markers), not by spelling:
  the donor's <eos> gets the row of the base's eos, whatever either is called;
* new: every other donor token. In the donor's embedding space its vector x is written as a
  sparse combination of k anchor tokens (shared tokens other than byte-fallback pieces, see
  ``anchor_pairs``), x ~= sum_j c_j e_donor(a_j), found by OMP
  over the unit-normalized anchors; the same coefficients applied to the anchors' base rows
  give its base row, e_base(new) = sum_j c_j e_base(a_j). The geometry shared by the two
  spaces carries the meaning over.

Input embeddings and the output head each get their own fit (the head's anchors and targets
come from the heads); a tied base stays tied. The config's vocabulary size and special ids
follow the donor; the donor's tokenizer files are copied. A report (counts by kind and role,
the mean relative reconstruction error ||x - D^T c|| / ||x|| in the donor space, timings) is
written to ``transplant_report.json`` in the output directory.

Baselines: ``mean`` (the mean base row), ``zero``, ``subword`` (the mean of the base rows of
the token's own spelling in the base tokenizer).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tether.alignment.omp import batch_omp, prepare

METHODS = ("omp", "mean", "zero", "subword")
# Turn markers of common chat formats, by role.
TURN_MARKERS = {
    "turn_start": ("<|im_start|>", "<start_of_turn>", "<|start_header_id|>", "<|user|>"),
    "turn_end": ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"),
}
SPECIAL_ROLES = ("bos", "eos", "pad", "unk")


@dataclass
class TransplantReport:
    base: str
    donor: str
    method: str
    k: int
    donor_vocab: int
    copied: int = 0
    anchors: int = 0
    new: int = 0
    special_by_role: dict = field(default_factory=dict)
    mean_relative_error: float | None = None
    seconds: dict = field(default_factory=dict)
    device: str = "cpu"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _load_tensor(model_dir: Path, names: tuple[str, ...]) -> tuple[str, torch.Tensor] | None:
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for name in names:
                if name in fh.keys():
                    return name, fh.get_tensor(name)
    return None


EMBED_NAMES = ("model.embed_tokens.weight", "embed_tokens.weight",
               "model.language_model.embed_tokens.weight", "transformer.wte.weight")
HEAD_NAMES = ("lm_head.weight",)


def _roles(hf_tokenizer: Any) -> dict[str, int]:
    """Special-token ids by role (bos, eos, pad, unk, turn_start, turn_end)."""
    roles = {}
    for role in SPECIAL_ROLES:
        tid = getattr(hf_tokenizer, f"{role}_token_id", None)
        if tid is not None:
            roles[role] = int(tid)
    vocab = hf_tokenizer.get_vocab()
    for role, names in TURN_MARKERS.items():
        for name in names:
            if name in vocab:
                roles[role] = int(vocab[name])
                break
    return roles


def canonical_ids(vocab: Any) -> dict[bytes, int]:
    """Bytes -> the one token id that stands for them in ``vocab``.

    A vocabulary can spell the same bytes twice: SentencePiece keeps ``<0x5F>`` (byte
    fallback) next to ``_``. Its tokenizer only ever produces one of them; the other is never
    seen in training, so its embedding is untrained. The canonical id is the one the tokenizer
    itself returns for the bytes; when it returns none of them, the lowest id.
    """
    groups: dict[bytes, list[int]] = {}
    for i, data in enumerate(vocab.token_bytes):
        if data is not None:
            groups.setdefault(data, []).append(i)
    canonical = {}
    for data, ids in groups.items():
        if len(ids) > 1:
            try:
                encoded = vocab.hf.encode(data.decode("utf-8"), add_special_tokens=False)
            except UnicodeDecodeError:
                encoded = []
            if len(encoded) == 1 and encoded[0] in ids:
                canonical[data] = encoded[0]
                continue
        canonical[data] = ids[0]
    return canonical


BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def byte_fallback_ids(vocab: Any) -> set[int]:
    """Ids of SentencePiece byte-fallback pieces (``<0x41>``) that stand for one byte."""
    pieces = vocab.hf.convert_ids_to_tokens(list(range(len(vocab.token_bytes))))
    return {i for i, piece in enumerate(pieces)
            if piece and BYTE_FALLBACK.fullmatch(piece)
            and vocab.token_bytes[i] is not None and len(vocab.token_bytes[i]) == 1}


def anchor_pairs(shared: dict, base_vocab: Any, donor_vocab: Any) -> dict:
    """The shared tokens OMP builds new tokens from: all but byte-fallback pieces.

    A byte-fallback piece is produced only for characters missing from the vocabulary, so in
    a large vocabulary its row is barely trained and points the same way as the never-used
    tokens' rows (Gemma 3: cosine 0.66 between ``<0xCC>`` and ``<unused0>``). As an anchor it
    would carry that untrained direction into the base space, where its counterpart is a
    trained byte token. Such pieces are still copied.
    """
    skip_donor, skip_base = byte_fallback_ids(donor_vocab), byte_fallback_ids(base_vocab)
    return {d: b for d, b in shared.items() if d not in skip_donor and b not in skip_base}


def match_vocabularies(base_vocab: Any, donor_vocab: Any) -> tuple[dict, dict, list[int]]:
    """(shared: donor id -> base id by bytes, special: donor id -> (role, base id), new ids).

    Only canonical tokens (``canonical_ids``) are shared: a donor duplicate such as
    ``<0x5F>`` is new, fitted from its own (untrained) donor row like any other new token.
    Copying ``_``'s row into it would give the model a second, never-tokenized ``_`` to
    predict, and make the untrained direction an anchor that every untrained donor token
    (Gemma's ``<unusedN>``) is then built from.
    """
    base_by_bytes = canonical_ids(base_vocab)
    donor_canonical = canonical_ids(donor_vocab)
    base_roles, donor_roles = _roles(base_vocab.hf), _roles(donor_vocab.hf)
    special = {}
    for role, donor_id in donor_roles.items():
        if role in base_roles and donor_id not in special:
            special[donor_id] = (role, base_roles[role])
    shared, new = {}, []
    for i, data in enumerate(donor_vocab.token_bytes):
        if i in special:
            continue
        if data is not None and data in base_by_bytes and donor_canonical[data] == i:
            shared[i] = base_by_bytes[data]
        else:
            new.append(i)
    return shared, special, new


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def approximate(method: str, base_rows: torch.Tensor, donor_rows: torch.Tensor,
                anchors: dict, new: list[int], *, base_vocab: Any, donor_vocab: Any, k: int,
                batch_size: int, device: torch.device,
                progress: bool = True,
                timings: dict | None = None) -> tuple[torch.Tensor, float | None]:
    """Rows of the base space for the ``new`` donor tokens, and the mean relative
    reconstruction error in the donor space (OMP only). ``timings`` receives the seconds of
    the OMP set-up (normalized anchors) and of the batches. ``anchors`` maps the donor ids
    OMP builds from to their base ids (``anchor_pairs``)."""
    from tqdm.auto import tqdm

    d_base = base_rows.shape[1]
    if method == "zero":
        return torch.zeros(len(new), d_base), None
    if method == "mean":
        return base_rows.float().mean(0, keepdim=True).expand(len(new), d_base).clone(), None
    if method == "subword":
        out = torch.empty(len(new), d_base)
        mean = base_rows.float().mean(0)
        for n, i in enumerate(new):
            data = donor_vocab.token_bytes[i]
            text = data.decode("utf-8", errors="ignore") if data else ""
            ids = base_vocab.hf.encode(text, add_special_tokens=False) if text else []
            out[n] = base_rows[ids].float().mean(0) if ids else mean
        return out, None
    if method != "omp":
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    timings = {} if timings is None else timings

    t0 = time.perf_counter()
    donor_ids = torch.tensor(list(anchors.keys()))
    base_ids = torch.tensor(list(anchors.values()))
    atoms = donor_rows[donor_ids].to(device, torch.float32)
    norms = atoms.norm(dim=1).clamp_min(1e-12)
    atoms = atoms / norms[:, None]
    atoms_base = base_rows[base_ids].to(device, torch.float32)
    prepared = prepare(atoms)  # laid out for selection (omp docstring)
    setup = time.perf_counter() - t0
    timings["omp_setup"] = round(timings.get("omp_setup", 0) + setup, 2)
    out = torch.empty(len(new), d_base)
    errors = []
    steps = range(0, len(new), batch_size)
    for start in tqdm(steps, desc="OMP", unit="batch", disable=not progress):
        ids = torch.tensor(new[start:start + batch_size])
        x = donor_rows[ids].to(device, torch.float32)
        idx, coef = batch_omp(x, atoms, k, prepared=prepared)
        recon = torch.einsum("bk,bkd->bd", coef, atoms[idx])
        errors.append(((recon - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)).cpu())
        # coefficients were fitted on unit-norm anchors: rescale for the raw anchor rows'
        # counterparts in the base space
        out[start:start + len(ids)] = torch.einsum(
            "bk,bkd->bd", coef / norms[idx], atoms_base[idx]).cpu()
    timings["omp_batches"] = round(timings.get("omp_batches", 0)
                                   + time.perf_counter() - t0 - setup, 2)
    return out, float(torch.cat(errors).mean()) if errors else None


def transplant(base: str, donor: str, out: str | Path, *, k: int = 64, method: str = "omp",
               device: str = "auto", batch_size: int | None = None,
               limit_new: int | None = None, progress: bool = True) -> TransplantReport:
    """Write to ``out`` the base model with the donor's tokenizer (see the module docstring).

    ``batch_size``: new tokens per OMP batch (default 2048); memory grows as batch x anchors.
    ``limit_new``: only approximate the first N new tokens (the others get the mean base row),
    for tests and timing on a subset.
    """
    from tether.constraints import vocab_for
    from tether.models import resolve

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if k < 1:
        raise ValueError("k must be at least 1")
    t0 = time.perf_counter()
    base_dir, donor_dir = Path(resolve(base)), Path(resolve(donor))
    out = Path(out)
    base_vocab, donor_vocab = vocab_for(str(base_dir)), vocab_for(str(donor_dir))
    base_config = json.loads((base_dir / "config.json").read_text())
    donor_config = json.loads((donor_dir / "config.json").read_text())
    dev = _device(device)
    if batch_size is None:
        batch_size = 2048
    report = TransplantReport(str(base), str(donor), method, k, donor_config["vocab_size"],
                              device=str(dev))

    embed = _load_tensor(base_dir, EMBED_NAMES)
    donor_embed = _load_tensor(donor_dir, EMBED_NAMES)
    if embed is None or donor_embed is None:
        raise ValueError("could not find the input embeddings of the base or the donor")
    embed_name, base_embed = embed
    head = _load_tensor(base_dir, HEAD_NAMES)
    tied = base_config.get("tie_word_embeddings", head is None)
    donor_head = _load_tensor(donor_dir, HEAD_NAMES)
    report.seconds["load"] = round(time.perf_counter() - t0, 2)

    shared, special, new = match_vocabularies(base_vocab, donor_vocab)
    anchors = anchor_pairs(shared, base_vocab, donor_vocab)
    report.copied, report.anchors, report.new = len(shared), len(anchors), len(new)
    report.special_by_role = {role: {"donor": d, "base": b} for d, (role, b) in special.items()}
    fitted = new if limit_new is None else new[:limit_new]

    def rebuild(base_rows: torch.Tensor, donor_rows: torch.Tensor) -> tuple[torch.Tensor, float]:
        size = donor_config["vocab_size"]
        rows = base_rows.float().mean(0, keepdim=True).expand(size, -1).clone()
        for d, b in shared.items():
            rows[d] = base_rows[b].float()
        for d, (_, b) in special.items():
            rows[d] = base_rows[b].float()
        approx, err = approximate(method, base_rows, donor_rows, anchors, fitted,
                                  base_vocab=base_vocab, donor_vocab=donor_vocab, k=k,
                                  batch_size=batch_size, device=dev,
                                  progress=progress, timings=report.seconds)
        if fitted:
            rows[torch.tensor(fitted)] = approx
        return rows.to(base_rows.dtype), err

    t1 = time.perf_counter()
    new_embed, report.mean_relative_error = rebuild(base_embed, donor_embed[1])
    tensors = {embed_name: new_embed}
    if not tied and head is not None:
        donor_out = donor_head[1] if donor_head is not None else donor_embed[1]
        tensors[head[0]], _ = rebuild(head[1], donor_out)
    report.seconds["approximate"] = round(time.perf_counter() - t1, 2)

    _write(base_dir, donor_dir, out, tensors, donor_vocab, base_config, report)
    report.seconds["total"] = round(time.perf_counter() - t0, 2)
    (out / "transplant_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


def _write(base_dir: Path, donor_dir: Path, out: Path, tensors: dict, donor_vocab: Any,
           base_config: dict, report: TransplantReport) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {}
    for path in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                weights[name] = tensors.get(name, fh.get_tensor(name))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    config = dict(base_config)
    hf = donor_vocab.hf
    config["vocab_size"] = report.donor_vocab
    for role in ("bos", "eos", "pad"):
        tid = getattr(hf, f"{role}_token_id", None)
        if tid is not None:
            config[f"{role}_token_id"] = int(tid)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": config.get("bos_token_id"),
                  "eos_token_id": config.get("eos_token_id"),
                  "pad_token_id": config.get("pad_token_id")}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    hf.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
