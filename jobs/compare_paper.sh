#!/usr/bin/env bash
# The optimizer comparison of docs/benchmarks.md, exactly as run there (CPU, 2 cores).
# Each command tunes every optimizer's step sizes with the same number of Tune trials and the same
# forward-pass budget, reruns the best settings with 3 seeds, and writes summary.md, results.parquet
# and curves.png under docs/results/compare/<task>/ (the run directories go under runs/).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# (a) MNIST-5k, small CNN (width 16, 14 k parameters), 3,000 forward passes per run, 3 trials, 2 seeds.
ray-s2p compare --config jobs/configs/mnist5k_cnn.yaml --output runs/compare/mnist5k_cnn \
  --set cluster.use_ray=false --set cluster.replicas=1 --set task.tiny_width=16 \
  --set checkpoint_every=0 --set task.eval_size=1000 --set eval_every=150 \
  --budget 3000 --trials 3 --seeds 0,1 --target 0.5

# (b) Rotten Tomatoes, MiniLM pooler + head (the default job's setup, 512 training reviews).
ray-s2p compare --config jobs/configs/default.yaml --output runs/compare/rt_minilm \
  --set cluster.use_ray=false --set cluster.replicas=1 --set cluster.mode=direction --set task.train_size=512 \
  --set task.eval_size=500 --set eval_every=250 --set checkpoint_every=0 --set optimizer.directions=1 \
  --optimizers vs2p,s2p_opt2,mezo,zo_sign,stp,adamw \
  --budget 3000 --trials 2 --seeds 0,1 --target 0.65 --no-ablations
