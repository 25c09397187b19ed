#!/usr/bin/env bash
# Every GPU measurement the docs still list as pending, in one call (the limits below add up to
# 7 minutes; the GPU k-NN bank, measured on the H200 in session 4, is no longer a step).
#
#   MAECT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh [STEP ...]
#
# Each step runs under its own time limit, so one that overruns costs only itself; its log goes
# to $OUT/gpu_check.log (or /tmp/gpu_check), and the rows the benchmark scripts append to
# docs/benchmarks.md are copied to $OUT after every step, so a call stopped at its limit keeps
# what it measured. With no STEP every step runs; `bash benchmarks/gpu_check.sh --list` names them.
# Needs a CUDA GPU, PyTorch, timm, Lightning and scikit-learn; lightly (the MAE peer) and litdata
# (the shards rows of data_path, left out without it) are taken from wheels in .whl/ when they
# are not installed (docs/performance.md, "Measuring on a GPU").
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# a short synthetic run (20 steps of 64 images) for the FSDP step
FSDP_RUN="data.name=synthetic data.synthetic_size=1280 data.batch_size=64 data.num_workers=8 trainer.epochs=1 trainer.strategy=fsdp trainer.devices=1 trainer.monitor_every=0 trainer.log_every_n_steps=5 trainer.progress_bar=false"

# name | time limit (s) | command
STEPS=(
  "env|20|nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv && $PY -c 'import torch, timm, lightning; print(torch.__version__, torch.version.cuda, timm.__version__, lightning.__version__)'"
  # the sync-free step against one that reads the guard and the loss on the host every step
  "sync_l16|50|$PY benchmarks/train_step.py --model vit_l16 --batch 64 --cases mae --candidates sync --rounds 3 --append && $PY benchmarks/train_step.py --model vit_l16 --batch 256 --cases mae --candidates sync --rounds 3 --inner 5 --append"
  # synchronising CUDA calls inside / outside real Lightning steps of every method, and img/s
  # with the logger reading every step vs every 10000 steps
  "sync_debug|50|$PY benchmarks/sync_check.py --steps 12 --batch 256 --append"
  # FSDP on one GPU: MAE pretraining and MAE-CT tuning from it; encoder.pt loads everywhere
  "fsdp|50|$PY -m maect pretrain recipe=mae/in1k_vit_b16 out=$OUT/fsdp_mae $FSDP_RUN && $PY -m maect tune recipe=maect/in1k_vit_b16 init=$OUT/fsdp_mae out=$OUT/fsdp_maect maect.head_epochs=1 $FSDP_RUN && $PY -c \"from maect.checkpoints import load_encoder as l; [print(r, 'encoder.pt loads:', sum(p.numel() for p in l('$OUT/'+r).parameters()), 'parameters') for r in ('fsdp_mae', 'fsdp_maect')]\" && tail -n 3 $OUT/fsdp_mae/metrics.csv"
  # activation memory at ViT-H/14, bf16, with and without checkpointing
  "memory_h14|45|$PY benchmarks/train_step.py --model vit_h14 --batch 32 --cases mae --memory --append"
  # trainer.compile=true and CUDA graphs (compile mode reduce-overhead) against eager MAE
  "compile_l16|75|$PY benchmarks/train_step.py --model vit_l16 --batch 64 --cases mae --candidates compile,cudagraphs --rounds 3 --warmup 3 --append"
  "candidates_l16|45|$PY benchmarks/train_step.py --model vit_l16 --batch 64 --cases mae,maect --candidates adamw,sdpa,precision,checkpointing,views,frozen --rounds 3 --append"
  "scale_b16|40|$PY benchmarks/train_step.py --model vit_b16 --batch 64 --scale --rounds 3 --append"
  "data_path|45|$PY benchmarks/data.py --device cuda --rounds 3 --append"
)

if [ "${1:-}" = "--list" ]; then
  for s in "${STEPS[@]}"; do echo "${s%%|*}"; done
  exit 0
fi
if ! $PY -c "import lightly, litdata" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

wanted=" $* "
for s in "${STEPS[@]}"; do
  name=${s%%|*}; rest=${s#*|}; limit=${rest%%|*}; cmd=${rest#*|}
  if [ $# -gt 0 ] && [[ "$wanted" != *" $name "* ]]; then continue; fi
  echo "== $name (limit ${limit} s): $cmd" | tee -a "$LOG"
  start=$(date +%s)
  timeout --kill-after=5 "$limit" bash -c "$cmd" >>"$LOG" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$LOG"
  cp docs/benchmarks.md "$OUT/benchmarks.md"
done
# The table rows and summary lines of every step, as the reply shows only the output's end.
grep -E '^\||^summary|^==|TFLOP/s' "$LOG" | tail -n 120
