"""COCO-format input to validated WebDataset shards: reading and checking annotations, images, splits, the
shard writer, the manifest, the synthetic product set, and their command line (`python -m data_prep`)."""
