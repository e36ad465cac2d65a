#!/usr/bin/env bash
# lambda = 1.0 ablation for magic-a and magic, ranked against the reproduction's ground truth
W=/tmp/nasfast_paper_repro
export OMP_NUM_THREADS=1 PATH=/work/venv/bin:$PATH
chain() {
  s=$1
  for seed in 0 1 2; do
    run=$W/runs_lambda1/$s-s$seed
    nasfast pretrain --config $W/config.yaml --out $run --sampler $s --set train.seed=$seed --set sampler.align_weight=1.0 --no-progress
    nasfast evaluate --run $run --archs $W/archs.txt --out $run/estimates.json --no-progress
    nasfast rank --estimates $run/estimates.json --truth $W/ground_truth --out $run/rank
  done
}
chain magic-a > /tmp/lambda_magic-a.log 2>&1 &
chain magic > /tmp/lambda_magic.log 2>&1 &
wait
