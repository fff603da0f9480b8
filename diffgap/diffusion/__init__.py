"""The DiffGAP refiner at inference: noise schedule + DDIM sampler (schedule.py), checkpoints and
query refinement (refiner.py). Training lives in diffgap.training.refiner."""
