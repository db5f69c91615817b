"""Fine-tuning FoL with the paper's objective (fol-method §10): losses, place datasets, the training loop.

Public API: `losses.FoLObjective`, the loss functions in `losses`, `data.PlacesDataset` and its builders,
`loop.TrainConfig` / `loop.train()`. `fol-ros train --config FILE` (fol_ros/commands/train.py) drives it.
"""
