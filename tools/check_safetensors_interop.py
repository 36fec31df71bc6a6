#!/usr/bin/env python3
"""Check that the Python safetensors library reads what msbnb writes (not run in CI: it needs the
venv). tests/fixtures/safetensors/msbnb_written.safetensors is msbnb's writer output (the C++ test
Safetensors.WriterOutputMatchesTheCommittedInteropFile checks it byte for byte); this script loads
it with safetensors.torch and safe_open and compares every tensor, dtype, shape and the metadata
with the values the C++ test wrote. Ends with INTEROP OK.

Usage: /work/venv/bin/python tools/check_safetensors_interop.py [FILE]
"""

import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests/fixtures/safetensors/msbnb_written.safetensors")

want = {
    "f64": torch.tensor([1.0 / 3.0, -2.5, 1e300], dtype=torch.float64),
    "f32_t": (torch.arange(6, dtype=torch.float32) * 0.5 - 1.0).reshape(2, 3).t().contiguous(),
    "f16": torch.tensor([0.5, -1.25, 65504.0, 2.0**-14], dtype=torch.float16),
    "bf16": torch.tensor([[1.5, -2.25], [3.0, 2.0**-7]], dtype=torch.bfloat16),
    "i64": torch.tensor([-(2**62), 0, 2**62 + 1], dtype=torch.int64),
    "i32": torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
    "i16": torch.tensor([-32768, 32767], dtype=torch.int16),
    "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
    "u8": torch.tensor([0, 1, 128, 255], dtype=torch.uint8),
    "bool": torch.tensor([True, False, True, True, False]),
    "c64": torch.tensor([1 + 2j, -0.5 - 0.25j], dtype=torch.complex64),
    "scalar": torch.tensor(7.25, dtype=torch.float32),
    "empty": torch.zeros(0, dtype=torch.float32),
    "empty2d": torch.zeros(2, 0, dtype=torch.int64),
}

got = load_file(path)
ok = True
if sorted(got) != sorted(want):
    print("names differ:", sorted(got), sorted(want))
    ok = False
for name, w in want.items():
    g = got.get(name)
    if g is None or g.dtype != w.dtype or g.shape != w.shape or not torch.equal(g, w):
        print(f"{name}: got {None if g is None else (g.dtype, tuple(g.shape), g)}, want {(w.dtype, tuple(w.shape), w)}")
        ok = False
with safe_open(path, framework="pt") as f:
    meta = f.metadata()
if meta != {"format": "pt", "writer": "msbnb \u00e9"}:
    print("metadata:", meta)
    ok = False
print(f"{path}: {len(got)} tensors, metadata {meta}")
print("INTEROP OK" if ok else "INTEROP FAILED")
sys.exit(0 if ok else 1)
