#!/usr/bin/env bash
# The main job end to end on the synthetic default, on the CPU: generate the synthetic product set, shard it,
# read it back, train under torchrun with 2 processes (DDP over gloo) with validation and a final test
# evaluation, then extract the attributes of the test images into SQLite with an annotated sample image.
# Extra arguments are training config overrides (e.g. train.epochs=1).
source "$(dirname "$0")/ensure_venv.sh"
DATA=data/synth
RUN=runs/demo_cpu
python -m data_prep synth --out "$DATA/raw" --num-images "${DEMO_IMAGES:-2000}" --seed 0 --overwrite --num-workers 2
python -m data_prep shard --input "$DATA/raw/annotations/instances.json:$DATA/raw/images" --out "$DATA/shards" \
  --splits train=0.8,val=0.1,test=0.1 --shard-max-count 64 --overwrite
python -m train.shard_reader "$DATA/shards/manifest.json"
rm -rf "$RUN"  # a fresh run, as the data above is fresh: an old run directory would be resumed, not retrained
torchrun --standalone --nproc_per_node=2 train/main.py --config configs/demo_cpu.yaml run_dir="$RUN" "$@"
# The final checkpoint (the newest) carries the test metrics that the database records with the model.
checkpoint="$(ls "$RUN"/checkpoint-*.pt | tail -n 1)"
python -m extract "$checkpoint" --manifest "$DATA/shards/manifest.json" --split test \
  --db "$RUN/attributes.sqlite" --annotate 4 --annotate-dir "$RUN/annotated"
echo "attribute counts in $RUN/attributes.sqlite:"
python -m extract query "$RUN/attributes.sqlite" --counts
echo "test images where a bottle was detected (first rows):"
python -m extract query "$RUN/attributes.sqlite" --attribute bottle | head -n 4
echo "test images with a red bottle (first rows):"
python -m extract query "$RUN/attributes.sqlite" --attribute bottle --colour red | head -n 4
echo "annotated images: $(ls "$RUN"/annotated/* | tr '\n' ' ')"
echo "main job done in $((SECONDS / 60)) min $((SECONDS % 60)) s"
