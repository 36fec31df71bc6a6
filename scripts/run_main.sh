#!/usr/bin/env bash
# The main job: install, build, and run the examples on built-in data (an error table for every
# format on the same weights).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
./build/release/examples/basic_usage
echo
./build/release/examples/functional_api
echo
./build/release/examples/quantized_matmul
echo
./build/release/examples/model_conversion   # LLaMA 7B / 13B / 70B memory table from measured layers
echo
./build/release/examples/fashion_mnist      # a real classifier converted to int8 / int4 / nf4: accuracy
echo
./build/release/examples/qlora_training --short --svg build/release/qlora_loss.svg  # QLoRA vs LoRA vs full fine-tuning on real text
echo
./build/release/bin/msbnb demo --out build/msbnb-demo-adapter  # the built-in KJV model in every format (size, perplexity, speed), then a minute of QLoRA
