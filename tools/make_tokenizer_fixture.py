#!/usr/bin/env python3
"""Train tiny SentencePiece models (LLaMA-1/2 style) and write tokenizer fixtures.

Writes tests/fixtures/tokenizer/ (relative to the repo root, or --out DIR):
  tokenizer.model   BPE, vocab 400, byte_fallback, split_digits, identity normalization,
                    add_dummy_prefix, no whitespace squeezing (the LLaMA tokenizer.model settings)
  expected.json     [{"text", "ids", "pieces", "decoded"}] from sp.encode(text) (no bos/eos)
  unigram.model     same corpus and settings, model_type=unigram (the C++ side must refuse it)
  corpus.sha256     sha256 of the training text and the list of source files

Training text: the files of /usr/share/common-licenses, sorted by name, symlinks resolved, each
real file once, concatenated (UTF-8, errors replaced).

Usage:  /work/venv/bin/python tools/make_tokenizer_fixture.py [--out DIR]
"""

import argparse
import hashlib
import io
import json
import os
import sys

import struct

import sentencepiece as spm

LIC = "/usr/share/common-licenses"


def corpus_files():
    seen = set()
    out = []
    for name in sorted(os.listdir(LIC)):
        real = os.path.realpath(os.path.join(LIC, name))
        if not os.path.isfile(real) or real in seen:
            continue
        seen.add(real)
        out.append(real)
    return out


def train(text, model_type):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()),
        model_writer=buf,
        model_type=model_type,
        vocab_size=400,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    return buf.getvalue()


def test_strings(text):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    picks = []
    # deterministic spread of license lines (some with leading indentation)
    step = max(1, len(lines) // 22)
    for i in range(0, len(lines), step):
        picks.append(lines[i])
        if len(picks) >= 22:
            break
    para = " ".join(ln.strip() for ln in lines[100:140])
    para = para[:300]
    extra = [
        "",
        " ",
        "  two  spaces",
        "a\tb\nc",
        "12345 and 3.14",
        "café naïve",
        "中文字",
        "🙂 ok",
        para,
        "   leading spaces",
        "trailing spaces   ",
        "  both ends  ",
        "\n",
        "Hello, World!",
        "GNU GENERAL PUBLIC LICENSE",
        "Copyright (C) 2007 Free Software Foundation, Inc. <https://fsf.org/>",
        "x",
        "ÿ\u00a0non-breaking\u00a0space",
    ]
    return picks + extra


# --------------------------------------------------------------------------- minimal protobuf reader
# (no google.protobuf needed; this is also what a C++ reader has to do).  Field numbers from
# sentencepiece_model.proto: ModelProto{1: repeated SentencePiece pieces, 2: TrainerSpec,
# 3: NormalizerSpec}; SentencePiece{1: piece, 2: score (float), 3: type (default NORMAL=1)};
# TrainerSpec{3: model_type (UNIGRAM=1 BPE=2 WORD=3 CHAR=4, default UNIGRAM), 25: split_digits,
# 35: byte_fallback, 40..43: unk/bos/eos/pad id}; NormalizerSpec{1: name, 2: precompiled_charsmap,
# 3: add_dummy_prefix, 4: remove_extra_whitespaces, 5: escape_whitespaces (proto2 defaults: true)}.
def _varint(b, i):
    r = 0
    sh = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << sh
        sh += 7
        if c < 0x80:
            return r, i


def pb_fields(b):
    i = 0
    out = []
    while i < len(b):
        key, i = _varint(b, i)
        f, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(b, i)
        elif wt == 1:
            v = b[i:i + 8]
            i += 8
        elif wt == 2:
            n, i = _varint(b, i)
            v = b[i:i + n]
            i += n
        elif wt == 5:
            v = b[i:i + 4]
            i += 4
        else:
            raise ValueError(f"wire type {wt}")
        out.append((f, wt, v))
    return out


PIECE_TYPES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}
MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}


def parse_model(blob):
    pieces, ts, ns = [], {}, {}
    for f, _wt, v in pb_fields(blob):
        if f == 1:
            p = {"piece": "", "score": 0.0, "type": 1}
            for g, _w, x in pb_fields(v):
                if g == 1:
                    p["piece"] = x.decode("utf-8")
                elif g == 2:
                    p["score"] = struct.unpack("<f", x)[0]
                elif g == 3:
                    p["type"] = x
            pieces.append(p)
        elif f == 2:
            ts = {g: x for g, _w, x in pb_fields(v)}
        elif f == 3:
            ns = {g: x for g, _w, x in pb_fields(v)}
    return pieces, ts, ns


def describe(label, blob):
    pieces, ts, ns = parse_model(blob)
    counts = {}
    for p in pieces:
        n = PIECE_TYPES.get(p["type"], str(p["type"]))
        counts[n] = counts.get(n, 0) + 1
    mt = ts.get(3, 1)
    info = {
        "bytes": len(blob),
        "pieces": len(pieces),
        "trainer_spec.model_type": f"{mt} ({MODEL_TYPES.get(mt)})",
        "trainer_spec.byte_fallback": bool(ts.get(35, 0)),
        "trainer_spec.split_digits": bool(ts.get(25, 0)),
        "trainer_spec.unk/bos/eos/pad_id": [ts.get(40, 0), ts.get(41, 1), ts.get(42, 2),
                                            (ts.get(43, -1) - (1 << 64)) if ts.get(43, 0) >= 1 << 63 else ts.get(43, -1)],
        "normalizer_spec.name": ns.get(1, b"").decode(),
        "normalizer_spec.precompiled_charsmap_bytes": len(ns.get(2, b"")),
        "normalizer_spec.add_dummy_prefix": bool(ns.get(3, 1)),
        "normalizer_spec.remove_extra_whitespaces": bool(ns.get(4, 1)),
        "normalizer_spec.escape_whitespaces": bool(ns.get(5, 1)),
        "normalizer_spec.fields_present": sorted(ns.keys()),
        "piece_type_counts": counts,
    }
    print(f"[{label}]")
    for k, v in info.items():
        print(f"    {k}: {v}")
    print(f"    pieces[0:4]: {[(p['piece'], p['type'], p['score']) for p in pieces[:4]]}")
    print(f"    pieces[258:263]: {[(p['piece'], p['type'], p['score']) for p in pieces[258:263]]}")
    print(f"    pieces[-3:]: {[(p['piece'], p['type'], p['score']) for p in pieces[-3:]]}")
    return info


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "tokenizer"))
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    files = corpus_files()
    parts = []
    for f in files:
        with open(f, "rb") as fh:
            parts.append(fh.read().decode("utf-8", errors="replace"))
    text = "\n".join(parts)
    with open(os.path.join(out, "corpus.sha256"), "w") as fh:
        fh.write(hashlib.sha256(text.encode("utf-8")).hexdigest() + "  training text\n")
        for f in files:
            fh.write(hashlib.sha256(open(f, "rb").read()).hexdigest() + "  " + f + "\n")

    bpe = train(text, "bpe")
    with open(os.path.join(out, "tokenizer.model"), "wb") as fh:
        fh.write(bpe)
    uni = train(text, "unigram")
    with open(os.path.join(out, "unigram.model"), "wb") as fh:
        fh.write(uni)

    describe("tokenizer.model (bpe)", bpe)
    describe("unigram.model", uni)

    sp = spm.SentencePieceProcessor(model_proto=bpe)
    cases = []
    for t in test_strings(text):
        ids = sp.encode(t, out_type=int)
        pieces = sp.encode(t, out_type=str)
        dec = sp.decode(ids)
        cases.append({"text": t, "ids": ids, "pieces": pieces, "decoded": dec})
    with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as fh:
        json.dump(cases, fh, ensure_ascii=False, indent=1)
        fh.write("\n")
    n_rt = sum(c["decoded"] == c["text"] for c in cases)
    print(f"expected.json: {len(cases)} cases, decode(encode(t)) == t for {n_rt}")
    for c in cases:
        if c["decoded"] != c["text"]:
            print(f"    not round-tripping: {c['text']!r} -> {c['decoded']!r}")
    for c in cases[22:30]:
        print(f"    {c['text']!r}: {c['pieces']} {c['ids']}")


if __name__ == "__main__":
    sys.exit(main())
