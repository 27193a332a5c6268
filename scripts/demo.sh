#!/usr/bin/env bash
# The main job end to end on the synthetic default, on the CPU: generate the synthetic product set, shard it,
# read it back, then train under torchrun with 2 processes (DDP over gloo), evaluate, and say where things are.
source "$(dirname "$0")/ensure_venv.sh"
DATA=data/synth
python -m data_prep synth --out "$DATA/raw" --num-images "${DEMO_IMAGES:-300}" --seed 0 --overwrite
python -m data_prep shard --input "$DATA/raw/annotations/instances.json:$DATA/raw/images" --out "$DATA/shards" \
  --splits train=0.7,val=0.15,test=0.15 --shard-max-count 32 --overwrite
python -m train.shard_reader "$DATA/shards/manifest.json"
torchrun --standalone --nproc_per_node=2 train/main.py --config configs/demo_cpu.yaml "$@"
