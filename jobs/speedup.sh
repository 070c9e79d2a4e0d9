#!/usr/bin/env bash
# Time to a target accuracy against the replica count: `ray-s2p bench speedup` (docs/benchmarks.md,
# "Time to a target against the replica count"; the report is docs/results/speedup.md).
#
# Protocol (ray_s2p/bench/speedup.py): per task preset, steps to a fixed target accuracy S(Q) for
# Q = 1, 2, 4, 8, 16, 32, 64 directions per step, every run with the same forward-pass budget; the default
# step scaling (linear from the Q = 1 step size, untuned) on the test split over seeds 0-2; a 5-point grid
# of step-size multipliers per Q on the validation split (seed 0) and the pick rerun on test; weak data
# mode (an N-fold batch at Q = 1) for N = 2, 4; then the wall clock on a quiet machine: Ray step times of
# 1 and 2 replicas, the step-cost model, the projected speed-up, and 1 against 2 real Ray replicas timed to
# the target. Every finished run goes into docs/results/progress/speedup.json at once (commit it after each
# part); the same command plus --resume continues a part, on this machine or another. Two parts may run at
# once on a 2-core machine (one thread each; the progress file is merged under a lock); the wall phase
# must run alone.
#
# Time on the 2-core CPU machine (2026-12-06, two parts at once): an rt_head run 50-105 s, an mnist_cnn
# run 155-210 s, a minilm_top run 200-280 s; a data-mode run costs N times as many forwards per step
# (mnist_cnn with N = 4: 10-27 minutes a run).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ONE_THREAD="--set cluster.threads_per_replica=1"  # two parts at once: one thread each, no oversubscription

for task in rt_head mnist_cnn minilm_top; do
  ray-s2p bench speedup --tasks "$task" --phase default --resume $ONE_THREAD
  ray-s2p bench speedup --tasks "$task" --phase tune --resume $ONE_THREAD
  ray-s2p bench speedup --tasks "$task" --phase tuned --resume $ONE_THREAD
  ray-s2p bench speedup --tasks "$task" --phase data --q 2,4 --resume $ONE_THREAD
done
# Alone on the machine: Ray replicas timed.
ray-s2p bench speedup --tasks rt_head,mnist_cnn,minilm_top --phase wall --resume $ONE_THREAD
ray-s2p bench speedup --tasks rt_head,mnist_cnn,minilm_top --report-only $ONE_THREAD
