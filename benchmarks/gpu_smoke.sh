#!/usr/bin/env bash
# GPU smoke test for a host with >= 2 CUDA GPUs (`make gpu-smoke`). About 5-10 minutes.
#
#   1. a 2-GPU torchrun on configs/tiny.yaml with train.device=cuda (NCCL), user_id pinned to
#      row_wise (CUDA-only sharding), tokenizer init at step 20, checkpoints every 30 steps, 60 steps;
#   2. the same command with --resume auto and 90 steps: resumes from step 60, trains 30 more;
#   3. dig eval of the final checkpoint on CPU (CUDA hidden): a CUDA-trained checkpoint loads on CPU;
#   4. the train-throughput benchmark on the GPUs (torchrec_vs_plain_pytorch, 1 and 2 ranks).
#
# Environment: PYTHON (default .venv/bin/python, a CUDA build of the pinned stack, e.g. the
# docker/Dockerfile image), DATA (default data/tiny), RUN (default runs/gpu_smoke),
# BENCH_ARGS (extra train_throughput.py arguments), SKIP_BENCH=1 to skip step 4.
# REHEARSAL=1 runs steps 1-3 on CPU (gloo, table_wise, no GPU needed) to check the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-data/tiny}
RUN=${RUN:-runs/gpu_smoke}
export PYTHONPATH=${PYTHONPATH:-$PWD}

DEVICE=(train.device=cuda "sharding.constraints.user_id=[row_wise]")
if [ "${REHEARSAL:-0}" = 1 ]; then
  DEVICE=(train.device=cpu); SKIP_BENCH=1; ngpu=2
  echo "== REHEARSAL=1: steps 1-3 on CPU"
else
  ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
fi
if [ "$ngpu" -lt 2 ]; then
  echo "gpu-smoke: needs 2 CUDA GPUs, this host has $ngpu (torch: $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)'))" >&2
  exit 2
fi
[ "${REHEARSAL:-0}" = 1 ] || echo "== gpu-smoke on $ngpu GPU(s): $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))')"

[ -f "$DATA/meta.json" ] || "$PY" -m dig_torchrec.cli data synth --preset tiny --out "$DATA"
rm -rf "$RUN"
COMMON=(--config configs/tiny.yaml "data.path=$DATA" "run_dir=$RUN" "${DEVICE[@]}"
        tokenizer.init_after_steps=20 train.checkpoint_every=30 train.log_every=10 train.val_max_batches=4)
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 2)

echo "== 1/4 train 60 steps on 2 GPUs"
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "${TORCHRUN[@]}" -m dig_torchrec.training.cli "${COMMON[@]}" train.max_steps=60
test -f "$RUN/checkpoints/step-60/COMPLETE"

echo "== 2/4 resume (--resume auto) to 90 steps"
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "${TORCHRUN[@]}" -m dig_torchrec.training.cli "${COMMON[@]}" train.max_steps=90 \
    --resume auto 2>&1 | tee "$RUN/resume.log"
grep -q "resumed from .*step-60 at step 60" "$RUN/resume.log"
test -f "$RUN/checkpoints/step-90/COMPLETE"

echo "== 3/4 dig eval on CPU"
CUDA_VISIBLE_DEVICES= "$PY" -m dig_torchrec.cli eval --checkpoint "$RUN/checkpoints/step-90" --no-progress \
    --max-users 200 --out "$RUN/eval_cpu.json"
test -s "$RUN/eval_cpu.json"

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== 4/4 train throughput on GPU (torchrec_vs_plain_pytorch)"
  "$PY" benchmarks/train_throughput.py --device cuda --rounds 1 --steps 20 --warmup 5 --profile-steps 0 \
      --batch-size 2048 --threads-per-rank 4 --out benchmarks/results/train_throughput_gpu.json ${BENCH_ARGS:-}
fi
echo "gpu-smoke: OK ($RUN)"
