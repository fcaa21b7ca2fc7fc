"""The training recipe, Ray-free: configs and presets, clip batches and augmentation, losses, the loop.

`pipelines/train.py` runs the same pieces on Ray Train with MLflow tracking; a notebook can call
`main(PRESETS["cpu-small"], "path/to/clips")` directly.
"""
from matting_core.training.batches import RECORD_COLUMNS, Batch, collate, iter_batches, make_sample, sample_rng
from matting_core.training.config import (PRESETS, AugmentConfig, LossWeights, OptimConfig, RecipeConfig,
                                          recipe_from_dict, recipe_to_dict)
from matting_core.training.engine import (build_model, build_optimizer, calibrate_batch_norm, evaluate, main,
                                          split_by_photo, train_one_epoch, train_step)
from matting_core.training.losses import matting_losses, warp

__all__ = ["AugmentConfig", "LossWeights", "OptimConfig", "RecipeConfig", "PRESETS", "recipe_to_dict",
           "recipe_from_dict", "Batch", "RECORD_COLUMNS", "sample_rng", "make_sample", "collate", "iter_batches",
           "warp", "matting_losses", "build_model", "build_optimizer", "calibrate_batch_norm", "train_step",
           "evaluate", "train_one_epoch", "main", "split_by_photo"]
