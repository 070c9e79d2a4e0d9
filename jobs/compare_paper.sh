#!/usr/bin/env bash
# The optimizer comparison of docs/benchmarks.md, exactly as run there (CPU, 2 cores).
# Each command tunes every optimizer's step sizes with the same number of Tune trials and the same
# forward-pass budget, reruns the best settings with 3 seeds, and writes summary.md, results.parquet
# and curves.png under runs/compare/<task>/ (tuning trials under tune/, the seed runs under runs/).
# The three commands are independent; docs/benchmarks.md ran them side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# (a) MNIST-5k, small CNN (width 16, 14 k parameters), 4,000 forward passes per run, 3 trials, 3 seeds,
#     every optimizer and the VS2P ablations.
ray-s2p compare --config jobs/configs/mnist5k_cnn.yaml --output runs/compare/mnist5k_cnn_v2 \
  --set cluster.use_ray=false --set cluster.replicas=1 --set task.tiny_width=16 \
  --set checkpoint_every=0 --set task.eval_size=1000 --set eval_every=200 \
  --budget 4000 --trials 3 --seeds 0,1,2 --target 0.25

# (a') MNIST-5k, ResNet-18-style network (GroupNorm, width 16, 0.7 M parameters), 1,200 forward passes,
#      2 trials, 3 seeds; six optimizers (a ResNet-18 step costs ~6x a CNN step on this CPU).
ray-s2p compare --config jobs/configs/mnist5k_resnet18.yaml --output runs/compare/mnist5k_resnet18 \
  --set cluster.use_ray=false --set cluster.replicas=1 \
  --set checkpoint_every=0 --set task.eval_size=1000 --set eval_every=100 \
  --optimizers vs2p,mezo,zo_sign,stp,sgd,adamw \
  --budget 1200 --trials 2 --seeds 0,1,2 --target 0.2 --no-ablations

# (b) Rotten Tomatoes, MiniLM pooler + head (the default job's setup, 512 training reviews), every
#     optimizer and the VS2P ablations, 3,000 forward passes, 3 trials, 3 seeds.
ray-s2p compare --config jobs/configs/default.yaml --output runs/compare/rt_minilm_v2 \
  --set cluster.use_ray=false --set cluster.replicas=1 --set cluster.mode=direction --set task.train_size=512 \
  --set task.eval_size=500 --set eval_every=250 --set checkpoint_every=0 --set optimizer.directions=1 \
  --budget 3000 --trials 3 --seeds 0,1,2 --target 0.62

# (c), (d) Low-rank directions (rank 2) on (b) and (a): VS2P and MeZO, the same budgets, trials and seeds.
ray-s2p compare --config jobs/configs/default.yaml --output runs/compare/rt_minilm_lowrank \
  --set cluster.use_ray=false --set cluster.replicas=1 --set cluster.mode=direction --set task.train_size=512 \
  --set task.eval_size=500 --set eval_every=250 --set checkpoint_every=0 --set optimizer.directions=1 \
  --set perturbation.distribution=lowrank --optimizers vs2p,mezo --no-ablations \
  --budget 3000 --trials 3 --seeds 0,1,2 --target 0.62
ray-s2p compare --config jobs/configs/mnist5k_cnn.yaml --output runs/compare/mnist5k_cnn_lowrank \
  --set cluster.use_ray=false --set cluster.replicas=1 --set task.tiny_width=16 \
  --set checkpoint_every=0 --set task.eval_size=1000 --set eval_every=200 \
  --set perturbation.distribution=lowrank --optimizers vs2p,mezo --no-ablations \
  --budget 4000 --trials 3 --seeds 0,1,2 --target 0.25
