"""`ember inspect MODEL.gguf [--json]`: what is in a model file, and whether ember runs it.

Reads only the validated header through ember.formats.gguf (tensor data stays
mapped, never touched), then reports: the verdict (can ember run this file,
and if not every reason why), the architecture and its hyper-parameters (from
ember.formats.model_config when ember runs that architecture, else the raw
metadata), a tokenizer summary read straight from the `tokenizer.ggml.*` keys, the tensor
table, the quant mix and the sizes.

The verdict asks the loaders themselves rather than a list of its own, so it
stays right as architectures, pre-tokenizers and quant types are added:
config_from_gguf (architecture, hyper-parameters, rope scaling), the
tokenizer's load_vocab (tokenizer model, pre-tokenizer, vocabulary), and the
quant codecs (every tensor type). A malformed file, or one whose tensor type
the GGUF reader does not know, raises GGUFError, which the CLI turns into one
line on stderr and exit status 2.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from typing import Any

from ember.daemon.chat import ChatTemplate, ChatTemplateError
from ember.formats import gguf, quant_blocks
from ember.formats.tokenizer_vocab import TokenizerError, load_vocab
from ember.formats.model_config import ARCH_SWITCHES, POOLING_TYPES, UnsupportedModel, config_from_gguf

MAX_SHOWN_ITEMS = 8        # longer metadata arrays are summarized as "[N x TYPE]"
MAX_SHOWN_CHARS = 80       # longer strings are cut
ARRAYS = (list, gguf.ArrayView)   # a metadata array: a view of the file, or a list of views

# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL.gguf", help="the GGUF file to inspect")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


# ---------------------------------------------------------------------------
# Gathering the report (plain data, shared by text and JSON)
# ---------------------------------------------------------------------------


def report(path: str) -> dict[str, Any]:
    """Everything `inspect` shows, as JSON-ready data."""
    with gguf.open(path) as f:
        tensors = [{"name": t.name, "type": t.type, "shape": list(t.shape), "bytes": t.nbytes}
                   for t in f.tensors.values()]
        hyper = _hyperparameters(f)
        doc = {
            "path": os.path.abspath(path),
            "file_bytes": f.size,
            "gguf_version": f.version,
            "alignment": f.alignment,
            "architecture": f.metadata.get("general.architecture"),
            "name": f.metadata.get("general.name"),
            "verdict": _verdict(f, hyper["unsupported"], tensors),
            **hyper,
            "tokenizer": _tokenizer(f.metadata),
            "tensors": tensors,
            "quant_mix": _quant_mix(tensors),
            "tensor_bytes": sum(t["bytes"] for t in tensors),
            "metadata": {k: _summarize(v, f.metadata_types[k]) for k, v in f.metadata.items()},
        }
    return doc


def _hyperparameters(f: gguf.GGUFFile) -> dict[str, Any]:
    arch = f.metadata.get("general.architecture")
    if not isinstance(arch, str):
        return {"hyperparameters": None,
                "unsupported": f"general.architecture is {type(arch).__name__}, not a string"}
    try:
        cfg = config_from_gguf(f)
    except UnsupportedModel as e:
        return {"hyperparameters": None, "unsupported": str(e)}
    hp = {fld.name: getattr(cfg, fld.name) for fld in dataclasses.fields(cfg)
          if fld.name not in ("arch", "tensors")}
    return {"hyperparameters": hp, "unsupported": None}


def _verdict(f: gguf.GGUFFile, model_problem: str | None, tensors: list[dict]) -> dict[str, Any]:
    """{"runs": bool, "reasons": [...], "notes": [...]}: every reason ember would refuse the
    file, by part; notes are what works differently than a user may expect."""
    reasons = []
    if model_problem is not None:
        reasons.append({"part": "model", "reason": model_problem})
    try:
        load_vocab(f.metadata, f.metadata_types, f.path)
    except TokenizerError as e:
        reasons.append({"part": "tokenizer", "reason": str(e).removeprefix(f"{f.path}: ")})
    for tname, names in _types_without_codec(tensors).items():
        reasons.append({"part": "tensor type",
                        "reason": f"tensor type {tname} is not supported ({len(names)} tensors, "
                                  f"e.g. {names[0]!r})"})
    return {"runs": not reasons, "reasons": reasons, "notes": _kind_notes(f.metadata)}


def _kind_notes(md: dict[str, Any]) -> list[str]:
    """An embedding model's note says what it is for; a generator's are about its chat template."""
    arch = md.get("general.architecture")
    if isinstance(arch, str) and ARCH_SWITCHES.get(arch, {}).get("encoder"):
        pooling = POOLING_TYPES.get(md.get(f"{arch}.pooling_type"), "none")
        return [f"an embedding model (pooling {pooling}): it makes vectors (`embed` op, "
                "POST /v1/embeddings, Model.embed), not text"]
    return _chat_notes(md)


def _chat_notes(md: dict[str, Any]) -> list[str]:
    source = md.get("tokenizer.chat_template")
    if source is None:
        return ["no tokenizer.chat_template: chat messages are rendered as ChatML "
                "(<|im_start|>role ... <|im_end|>)"]
    try:
        ChatTemplate(source)
    except ChatTemplateError as e:
        return [f"chat requests will fail, plain prompts work: {e}"]
    return []


def _types_without_codec(tensors: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for t in tensors:
        if not quant_blocks.can_compute(t["type"]):
            out.setdefault(t["type"], []).append(t["name"])
    return out


def _tokenizer(md: dict[str, Any]) -> dict[str, Any]:
    tokens = md.get("tokenizer.ggml.tokens")
    merges = md.get("tokenizer.ggml.merges")
    return {
        "model": md.get("tokenizer.ggml.model"),
        "pre": md.get("tokenizer.ggml.pre"),
        "vocab_size": len(tokens) if isinstance(tokens, ARRAYS) else None,
        "merges": len(merges) if isinstance(merges, ARRAYS) else None,
        "bos_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_id": md.get("tokenizer.ggml.eos_token_id"),
        "chat_template": "tokenizer.chat_template" in md,
    }


def _quant_mix(tensors: list[dict]) -> dict[str, dict[str, int]]:
    count, size = Counter(), Counter()
    for t in tensors:
        count[t["type"]] += 1
        size[t["type"]] += t["bytes"]
    order = sorted(count, key=lambda k: -size[k])
    return {k: {"tensors": count[k], "bytes": size[k]} for k in order}


def _summarize(value, spec):
    """Metadata as shown: long arrays become '[N x TYPE]', long strings are cut."""
    if isinstance(value, ARRAYS):
        sub = spec[1]   # element type, or one spec per element for arrays of arrays
        if len(value) > MAX_SHOWN_ITEMS:
            inner = gguf.VALUE_TYPE_NAMES[sub] if isinstance(sub, int) else "ARRAY"
            return f"[{len(value)} x {inner}]"
        specs = sub if isinstance(sub, tuple) else [(sub, None)] * len(value)
        return [_summarize(v, s) for v, s in zip(value, specs)]
    if isinstance(value, str) and len(value) > MAX_SHOWN_CHARS:
        return value[:MAX_SHOWN_CHARS] + f"... ({len(value)} chars)"
    return value


# ---------------------------------------------------------------------------
# Text output
# ---------------------------------------------------------------------------


def run(args) -> int:
    doc = report(args.model)
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        print("\n".join(_text(doc)))
    return 0


def _text(doc: dict) -> list[str]:
    lines = [f"file          {doc['path']}",
             f"format        GGUF v{doc['gguf_version']}, alignment {doc['alignment']}, "
             f"{len(doc['tensors'])} tensors, {len(doc['metadata'])} metadata keys",
             f"architecture  {doc['architecture']}" + (f"  ({doc['name']})" if doc["name"] else ""),
             *_text_verdict(doc["verdict"]),
             ""]
    lines += _text_hyperparameters(doc)
    tok = doc["tokenizer"]
    lines += ["", "tokenizer", f"  model {tok['model']}, pre {tok['pre']}, vocab {tok['vocab_size']}, "
              f"merges {tok['merges']}, bos {tok['bos_id']}, eos {tok['eos_id']}, "
              f"chat template {'yes' if tok['chat_template'] else 'no'}", ""]
    lines += ["tensors"] + _text_tensors(doc["tensors"])
    lines += ["", "quant mix"]
    total = doc["tensor_bytes"] or 1
    for tname, m in doc["quant_mix"].items():
        lines.append(f"  {tname:<7} {m['tensors']:>5} tensors  {_size(m['bytes']):>10}  "
                     f"{100 * m['bytes'] / total:5.1f}%")
    lines += ["", f"total         {_size(doc['tensor_bytes'])} of tensors, "
                  f"{_size(doc['file_bytes'])} file"]
    return lines


def _text_verdict(verdict: dict) -> list[str]:
    notes = [f"  note: {n}" for n in verdict["notes"]]
    if verdict["runs"]:
        return ["verdict       ember can run this file"] + notes
    return ["verdict       ember cannot run this file:"] + \
        [f"  {r['part']}: {r['reason']}" for r in verdict["reasons"]] + notes


def _text_hyperparameters(doc: dict) -> list[str]:
    hp = doc["hyperparameters"]
    if hp is not None:
        return ["hyper-parameters"] + [f"  {k:<16} {v:g}" if isinstance(v, float) else
                                       f"  {k:<16} {v}" for k, v in hp.items()]
    lines = [f"hyper-parameters: not read ({doc['unsupported']}); raw metadata:"]
    for k, v in doc["metadata"].items():
        if not k.startswith("tokenizer."):
            lines.append(f"  {k:<40} {v}")
    return lines


def _text_tensors(tensors: list[dict]) -> list[str]:
    rows = [(t["name"], t["type"], "x".join(map(str, t["shape"])), str(t["bytes"])) for t in tensors]
    head = ("NAME", "TYPE", "SHAPE", "BYTES")
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    return [f"  {a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d:>{w[3]}}" for a, b, c, d in [head, *rows]]


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
