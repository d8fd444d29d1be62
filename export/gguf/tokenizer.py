"""The tokenizer side of a GGUF file: ``tokenizer.ggml.*`` from a checkpoint's tokenizer.json.

Byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen, Phi-4, GLM-4) are written as llama.cpp's
``gpt2`` model with the pre-tokenizer name llama.cpp uses for their split regex. llama.cpp's
convert_hf_to_gguf.py finds that name by hashing the tokenization of a probe text; here it comes from (1) the
caller, (2) the GGUF the checkpoint was made from (through the manifests' ``source`` links) when its vocabulary
is the same, or (3) the structure of tokenizer.json's pre_tokenizer. Other tokenizers (SentencePiece-style with
byte fallback, as Gemma's) are copied whole from that source GGUF when its vocabulary is the checkpoint's, and
refused with one line otherwise. The result is the ``tokenizer.*`` keys to write; nothing is written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
from edgeprune.export.gguf.reader import metadata
from edgeprune.export.gguf.source import read_json

from edgeprune.errors import EdgePruneError

# pre-tokenizer regexes of known Hugging Face tokenizers -> llama.cpp's tokenizer.ggml.pre name
_SPLIT_REGEX_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def read_tokenizer(ckpt: Path, cfg: dict, n_vocab: int, pre_override: str | None) -> dict:
    """Everything tokenizer.ggml.* needs, from tokenizer.json / tokenizer_config.json."""
    tj_path = ckpt / "tokenizer.json"
    if not tj_path.is_file():
        raise EdgePruneError(f"{ckpt} has no tokenizer.json (a fast BPE tokenizer is needed for GGUF)")
    tj = read_json(tj_path, "tokenizer")
    tcfg = read_json(ckpt / "tokenizer_config.json", "tokenizer config") \
        if (ckpt / "tokenizer_config.json").is_file() else {}
    model = tj.get("model") or {}
    if not isinstance(model.get("vocab"), dict):
        raise EdgePruneError(f"tokenizer model {model.get('type')!r} has no token -> id vocabulary")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        vocab.setdefault(content, t["id"])
    by_id: dict[int, str] = {i: s for s, i in vocab.items()}
    if max(by_id) >= n_vocab:
        raise EdgePruneError(f"tokenizer has token id {max(by_id)} but the embedding only {n_vocab} rows")
    tokens, types = [], []
    for i in range(n_vocab):
        s = by_id.get(i)
        if s is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        elif s in added:
            tokens.append(s)
            types.append(3 if added[s].get("special") else 4)  # CONTROL / USER_DEFINED
        else:
            tokens.append(s)
            types.append(1)  # NORMAL
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        copied = _copy_source_tokenizer(ckpt, tokens)
        if copied is None:
            raise EdgePruneError("only byte-level BPE tokenizers (GPT-2 style) can be written to GGUF by edgeprune, "
                                 "or a tokenizer the checkpoint's source GGUF holds with the same vocabulary")
        return copied
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        # llama.cpp requires the key and gguf-py refuses empty arrays: a merge of two multi-character
        # control tokens never applies (BPE starts from single characters and there is no other merge).
        ctrl = [s for s, t in added.items() if t.get("special") and len(s) > 1 and " " not in s]
        if not ctrl:
            raise EdgePruneError("tokenizer has no merges and no special token to write a no-op merge with")
        merges = [f"{ctrl[0]} {ctrl[-1]}"]
    pre, pre_source = _pre_tokenizer(ckpt, tj, tokens, bool(model.get("merges")), pre_override)

    def tok_id(key: str) -> int | None:
        val = tcfg.get(key)
        if isinstance(val, dict):
            val = val.get("content")
        if isinstance(val, str) and val in vocab:
            return vocab[val]
        cid = cfg.get(f"{key}_id")
        return cid if isinstance(cid, int) and 0 <= cid < n_vocab else None

    specials = {k: tok_id(f"{k}_token") for k in ("bos", "eos", "unk", "pad")}
    add_bos = tcfg.get("add_bos_token")
    if add_bos is None:
        single = ((tj.get("post_processor") or {}).get("single")) or []
        add_bos = any("SpecialToken" in part for part in single[:1])
    template = tcfg.get("chat_template")
    if template is None and (ckpt / "chat_template.jinja").is_file():
        template = (ckpt / "chat_template.jinja").read_text()
    K = gguf.Keys.Tokenizer
    kv = {K.MODEL: "gpt2", K.PRE: pre, K.LIST: tokens, K.TOKEN_TYPE: types, K.MERGES: merges,
          K.ADD_BOS: bool(add_bos), K.ADD_EOS: bool(tcfg.get("add_eos_token", False))}
    for key, name in ((K.BOS_ID, "bos"), (K.EOS_ID, "eos"), (K.UNK_ID, "unk"), (K.PAD_ID, "pad")):
        if specials[name] is not None:
            kv[key] = specials[name]
    if isinstance(template, str):
        kv[K.CHAT_TEMPLATE] = template
    return {"kv": kv, "model": "gpt2", "pre": pre, "pre_source": pre_source, "add_bos": bool(add_bos),
            "n_tokens": len(tokens), "n_merges": len(merges)}


def _pre_tokenizer(ckpt: Path, tj: dict, tokens: list[str], has_merges: bool,
                   override: str | None) -> tuple[str, str]:
    """llama.cpp's pre-tokenizer name. convert_hf_to_gguf.py hashes the tokenization of a probe text and looks
    the hash up in a table; here: (1) the caller's choice, (2) the GGUF the checkpoint was made from, found
    through the manifests' ``source`` links, when its vocabulary is the same (the default model's cache was
    dequantized from a GGUF whose tokenizer transformers rebuilt without its digit splitting: SmolLM2's
    original pre-tokenizer is ``smollm``), (3) the structure of tokenizer.json's pre_tokenizer."""
    if override:
        return override, "argument"
    from_gguf = _pre_from_source_gguf(ckpt, tokens)
    if from_gguf:
        return from_gguf
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"]:
        if steps[0].get("use_regex", True) or not has_merges:
            return "gpt-2", "tokenizer.json"  # with no merges any pre-split gives the same byte tokens
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm", "tokenizer.json"  # digits one by one, then the GPT-2 regex (also starcoder's)
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _SPLIT_REGEX_PRE.get((steps[0].get("pattern") or {}).get("Regex", ""))
        if name:
            return name, "tokenizer.json"
    raise EdgePruneError(f"unrecognised pre-tokenizer {kinds} in {ckpt / 'tokenizer.json'}: "
                         "pass pre_tokenizer=<llama.cpp name> to export_gguf")


def _source_gguf(ckpt: Path) -> Path | None:
    """The GGUF file the checkpoint was made from, following the manifests' ``source`` links (pruned checkpoint
    -> model cache -> .gguf)."""
    seen: set[str] = set()
    path = ckpt
    for _ in range(4):
        mf = path / "manifest.json"
        if not mf.is_file():
            return None
        try:
            src = json.loads(mf.read_text()).get("source")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(src, str) or src in seen:
            return None
        seen.add(src)
        p = Path(src)
        if p.is_file() and p.suffix == ".gguf":
            return p
        if not p.is_dir():
            return None
        path = p
    return None


def _source_tokenizer_meta(ckpt: Path, tokens: list[str]) -> tuple[dict, Path] | None:
    """The source GGUF's tokenizer keys when its token list is the checkpoint's, id for id."""
    p = _source_gguf(ckpt)
    if p is None:
        return None
    try:
        meta = metadata(p, full_arrays=True)
    except EdgePruneError:
        return None
    theirs = meta.get(gguf.Keys.Tokenizer.LIST)
    if not isinstance(theirs, list) or len(theirs) != len(tokens) or any(
            a != b and a.replace("\u2581", " ") != b.replace("\u2581", " ") for a, b in zip(theirs, tokens, strict=True)):
        return None  # "\u2581" is SentencePiece's space: transformers writes it where a GGUF may hold " "
    return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}, p


def _pre_from_source_gguf(ckpt: Path, tokens: list[str]) -> tuple[str, str] | None:
    found = _source_tokenizer_meta(ckpt, tokens)
    if found is None or not found[0].get(gguf.Keys.Tokenizer.PRE):
        return None
    return str(found[0][gguf.Keys.Tokenizer.PRE]), f"source GGUF {found[1].name}"


def _copy_source_tokenizer(ckpt: Path, tokens: list[str]) -> dict | None:
    """Every ``tokenizer.*`` key of the source GGUF (SentencePiece-style vocabularies with scores, as Gemma's,
    which tokenizer.json cannot be turned back into exactly)."""
    found = _source_tokenizer_meta(ckpt, tokens)
    if found is None:
        return None
    kv, p = found
    K = gguf.Keys.Tokenizer
    return {"kv": kv, "model": str(kv.get(K.MODEL)), "pre": kv.get(K.PRE), "pre_source": f"source GGUF {p.name}",
            "add_bos": bool(kv.get(K.ADD_BOS, False)), "n_tokens": len(tokens), "n_merges": len(kv.get(K.MERGES, []))}
