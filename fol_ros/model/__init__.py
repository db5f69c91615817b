"""FoL network in PyTorch: backbone, aggregator, local branch, checkpoints and default weights."""
from fol_ros.model.fol import FoLNet, FoLOutput, TrainOutput

__all__ = ['FoLNet', 'FoLOutput', 'TrainOutput']
