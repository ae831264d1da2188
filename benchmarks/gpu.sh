#!/usr/bin/env bash
# Sparse execution on one GPU: a LLaMA-2-7B-shaped model (all 32 layers, hidden 4096, MLP 11008, 32 heads,
# vocab 32000) with random weights in bf16, dense vs masked vs sparse, prefill and decode at batch 1 and 8
# (prompt 512 tokens, 16 decode steps), at 0%, 25% and 40% random per-token skipping. Estimated at a few
# minutes on an H100 (not yet run on one); cut off at 7 minutes, keeping what was measured. Nothing is downloaded:
# the weights are random and the model is built from a LlamaConfig. Needs about 20 GB of GPU memory.
#
#   benchmarks/gpu.sh [OUTPUT_DIR] [more benchmarks/speed.py flags]
#
# OUTPUT_DIR defaults to $OUT. Written there: gpu_speed.json (benchmarks/speed.py's JSON, rewritten after
# every measurement), gpu_speed.md (its table) and gpu_env.txt (GPU, driver, library versions).
# Later flags override earlier ones, e.g. `--llama-layers 8` on a smaller GPU, or
# `--device cpu --llama-layers 1 --llama-seq-len 16 --repeats 1` to try the script without a GPU.
# The project pins transformers (pyproject.toml); if the machine has another version, bring the pinned
# wheel in .whl/ (pip download --no-deps transformers==VERSION -d .whl) and it is installed for the run.
set -euo pipefail

if [[ $# -gt 0 && $1 != --* ]]; then
  out=$1
  shift
else
  out=${OUT:-}
fi
if [[ -z $out ]]; then
  echo "usage: benchmarks/gpu.sh [OUTPUT_DIR] [speed.py flags]  (OUTPUT_DIR defaults to \$OUT, which is unset)" >&2
  exit 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)  # a relative OUTPUT_DIR is the caller's, not the project root's
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site .whl/*.whl
  export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}  # the project itself, uninstalled

# Fail in seconds, not after building 7B parameters, if the libraries are not the ones the project runs on.
pinned=$(sed -n 's/.*"transformers==\([^"]*\)".*/\1/p' pyproject.toml)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: not available"
  "$python" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| cuda", torch.version.cuda, "| transformers", transformers.__version__)'
} | tee "$out/gpu_env.txt"
have=$("$python" -c 'import transformers; print(transformers.__version__)')
if [[ -n $pinned && $have != "$pinned" ]]; then
  echo "transformers $have is here, the project pins $pinned: bring its wheel in .whl/ (see the top of $0)" >&2
  exit 1
fi

timeout 420 "$python" benchmarks/speed.py --device cuda --models llama7b --llama-layers 32 --llama-batches 1,8 \
  --llama-seq-len 512 --sparsities 0,0.25,0.4 --repeats 3 --output "$out/gpu_speed.json" "$@" |
  tee "$out/gpu_speed.md"
