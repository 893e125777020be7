"""The one IPMT model definition: backbone, network, transformer, losses."""
from .checkpoint import CheckpointError, load_published_checkpoint, read_checkpoint
from .losses import duplex_segmentation_loss, weighted_dice_loss
from .network import IPMT
from .transformer import IPMTransformer

__all__ = ["CheckpointError", "IPMT", "IPMTransformer", "duplex_segmentation_loss", "load_published_checkpoint",
           "read_checkpoint", "weighted_dice_loss"]
