"""MattingNet (MobileNetV2 U-Net with ConvLSTM and attention on every skip), checkpoints, export."""
from matting_core.model.backbone import SKIP_INDICES, BackboneWeightsError
from matting_core.model.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from matting_core.model.net import MattingNet, matting_net

__all__ = ["MattingNet", "matting_net", "SKIP_INDICES", "BackboneWeightsError",
           "save_checkpoint", "load_checkpoint", "read_checkpoint", "CheckpointError"]
