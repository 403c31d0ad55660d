"""Training, as train.py runs it: `inputs` (features or images and captions -> datasets), `datasets` (caption
tokens and their cache, datasets, padding, the resumable sampler), `loop` (the optimizer steps, validation,
checkpoints), `state` (resume checkpoints, RNG, processes, the training log), `evaluation` (CIDEr during training and
the best export), `finetune` (starting from an export: --init_from)."""
