"""The training system behind training/train.py: config checking, the loop, checkpoints."""
