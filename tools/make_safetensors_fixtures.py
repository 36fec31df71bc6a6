#!/usr/bin/env python3
"""Write the safetensors / quant_state interop fixtures of tests/fixtures/safetensors/ with the
real Python `safetensors` and `bitsandbytes` (tests/io/safetensors_test.cpp checks the values).

  python_dtypes.safetensors   every dtype torch and safetensors share that msbnb reads (F64 F32
                              F16 BF16 I64 I32 I16 I8 U8 BOOL C64), a scalar (shape []), empty
                              tensors (shapes [0] and [2, 0]) and __metadata__; values are exact
                              in every dtype, listed in the C++ test.
  bnb_quant_state_nf4.json    bitsandbytes' packed quant_state bytes (pack_dict_to_tensor) for
  bnb_quant_state_fp4_dq.json quantize_4bit of fixed inputs: nf4 fp16 blocksize 64 without, and
                              fp4 bf16 blocksize 128 with double quantization (nested_offset
                              a float32 mean written as Python's repr of the double).

Deterministic (fixed seed, no timestamps): reruns give identical files.
Usage: /work/venv/bin/python tools/make_safetensors_fixtures.py [--out DIR]
"""

import argparse
import os

import torch
from safetensors.torch import save_file

import bitsandbytes.functional as F


def dtypes_file(path):
    t = {
        "f64": torch.tensor([1.0 / 3.0, -2.5, 1e300], dtype=torch.float64),
        "f32": (torch.arange(6, dtype=torch.float32) * 0.5 - 1.0).reshape(2, 3),
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
    save_file(t, path, metadata={"format": "pt", "msbnb": "fixture \u00e9"})


def quant_state_bytes(quant_type, dtype, blocksize, nested):
    g = torch.Generator().manual_seed(20261202)
    w = torch.randn(64, 96, generator=g).to(dtype)
    _, qs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    packed = qs.as_dict(packed=True)
    key = "quant_state.bitsandbytes__" + quant_type
    return bytes(packed[key].numpy())


def main():
    ap = argparse.ArgumentParser()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    ap.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "safetensors"))
    out = ap.parse_args().out
    os.makedirs(out, exist_ok=True)
    dtypes_file(os.path.join(out, "python_dtypes.safetensors"))
    for name, args in {
        "bnb_quant_state_nf4.json": ("nf4", torch.float16, 64, False),
        "bnb_quant_state_fp4_dq.json": ("fp4", torch.bfloat16, 128, True),
    }.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(quant_state_bytes(*args))
    for f in sorted(os.listdir(out)):
        print(f, os.path.getsize(os.path.join(out, f)))


if __name__ == "__main__":
    main()
