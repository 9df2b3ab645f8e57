#!/bin/bash
# Builds, on this machine, what the device tool's GPU machine needs for the obqa_gpu suite of
# benchmarks/calibration.py (see benchmarks/README.md, "On a GPU"). Run from the repository root
# with the project's venv active. Writes two git-ignored folders, one per call (64 MiB each):
#   .devcarry1/  wheels (pyro-ppl, peft, datasets, gguf and the transformers 5.25 stack the GPU
#                image lacks), the shared data (tar.xz) and the first 36 MiB of SmolLM2's GGUF file;
#   .devcarry2/  the rest of the GGUF file (94 MiB in all: more than one call carries).
set -euo pipefail
GGUF=$(python -c "from pyro_monteclora.examples import smollm2_path, SMOLLM2_FILE; print(smollm2_path() + '/' + SMOLLM2_FILE)")
for d in .devcarry1 .devcarry2; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
rm -rf .devcarry1 .devcarry2 && mkdir -p .devcarry1/whl .devcarry2
version() { python -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
for name in pyro-ppl pyro-api peft datasets dill multiprocess gguf transformers huggingface_hub httpx2 httpcore2 \
            truststore idna kernels tomlkit; do
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .devcarry1/whl "$name==$(version "$name")" 2>&1 | grep -v "^WARNING: Location" || true
done
tar -C ../shared -cJf .devcarry1/data.tar.xz data
head -c 37748736 "$GGUF" > .devcarry1/gguf_a
tail -c +37748737 "$GGUF" > .devcarry2/gguf_b
sha256sum "$GGUF" | cut -d' ' -f1 > .devcarry2/gguf.sha256
du -sh .devcarry1 .devcarry2
