"""ipmt-fast: a faithful, fast IPMT (Intermediate Prototype Mining Transformer, NeurIPS 2022).

``ipmt_fast.IPMT`` is the model; ``ipmt_fast.ops`` holds the fused hot-path ops and their
backends; ``ipmt_fast.load_published_checkpoint`` loads the published weights.

Importing the package corrects a TorchInductor CPU scheduling bug that zeroes gradients through
``F.interpolate`` under ``torch.compile`` (see ``ipmt_fast.inductor_fix``).
"""
from . import inductor_fix, ops
from .model import IPMT, IPMTransformer, duplex_segmentation_loss, load_published_checkpoint, weighted_dice_loss

__version__ = "0.1.0"
inductor_fix.apply()
__all__ = ["IPMT", "IPMTransformer", "duplex_segmentation_loss", "load_published_checkpoint", "ops",
           "weighted_dice_loss"]
