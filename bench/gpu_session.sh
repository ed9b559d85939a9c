#!/usr/bin/env bash
# One GPU session's checks and figures, for the device machine (see README "Benchmarks").
# Needs the wheels its image lacks in .whl/ (bitsandbytes with its CUDA 13 build, gguf, nltk,
# rouge-score, defusedxml, chitchat-dataset). Writes logs and JSON to $OUT (or ./gpu_out).
#   bench/gpu_session.sh [tests] [tests-nf4] [nf4] [nf4-quick] [generate] [kernels] [train] [profile] [memory]
#   (default: all but memory)
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton, transformers, bitsandbytes as b; print(torch.__version__, triton.__version__, transformers.__version__, b.__version__)"
steps=${*:-tests nf4 generate kernels train profile}

for s in $steps; do
  echo "=== $s"; t0=$(date +%s)
  case $s in
    nf4-quick) timeout 100 python3 bench/bench_nf4.py --quick 2>&1 | tail -13 | tee "$OUT/nf4_quick.log" ;;
    tests) timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -40 | tee "$OUT/tests.log" ;;
    generate) timeout 300 python3 -m spt_fast bench generate --model preset:llama-2-7b --dtype bf16 --load-4bit --context-len 512 \
                --compile --json "$OUT/gen_gpu.json" 2>&1 | tail -12 ;;
    kernels) timeout 120 python3 -m spt_fast bench kernels 2>&1 | tail -30 ;;
    train) timeout 300 python3 -m spt_fast bench train --model preset:llama-2-7b --dtype bf16 --load-4bit --batch-size 8 \
             --context-len 256 --response-len 32 --json "$OUT/train_gpu.json" 2>&1 | tail -12 ;;
    nf4) timeout 240 python3 bench/bench_nf4.py --write "$OUT/nf4_tiles.json" 2>&1 | tail -16 | tee "$OUT/nf4.log"
         [ -s "$OUT/nf4_tiles.json" ] && export SPT_FAST_NF4_TILES="$OUT/nf4_tiles.json" && cat "$OUT/nf4_tiles.json" ;;
    tests-nf4) timeout 200 python3 -m pytest -q -m gpu -k "nf4 or 4bit" -p no:cacheprovider tests 2>&1 | tail -30 | tee "$OUT/tests_nf4.log" ;;
    memory) timeout 300 python3 -m spt_fast bench memory --model preset:llama-2-7b --model preset:llama-2-13b \
              --layout shared --activation-checkpointing -K 4 --json "$OUT/memory_gpu.json" 2>&1 | tail -6 ;;
    profile) timeout 200 python3 bench/profile_decode.py 2>&1 | tail -45 | tee "$OUT/profile.log" ;;
    *) echo "unknown step $s" ;;
  esac
  echo "=== $s took $(( $(date +%s) - t0 )) s"
done
