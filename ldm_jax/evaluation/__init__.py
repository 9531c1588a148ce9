"""Evaluation: is a run good? Sample-quality metrics in JAX/NumPy and the built-in shapes scoring.

  fid.py         Fréchet distance and KID in float64, pytorch-fid `.npz` statistics
  features.py    the FID InceptionV3 feature extractor (pytorch-fid / clean-fid resizes), batch-sharded
  clip_score.py  CLIP score (torchmetrics' 100·max(cos, 0)) from a transformers CLIP folder
  reference.py   reference statistics of a dataset split, computed once and cached
  shapes_eval.py the main job's held-out-prompt scoring (color/shape accuracy)
  __main__.py    python -m ldm_jax.evaluation fid|kid|clip|stats ... (and the shapes scoring)

Library code here imports models/, interop/, data/ and pipeline.py, never training/.
"""
from ldm_jax.evaluation.shapes_eval import (
    evaluate_shapes,
    evaluate_workdir,
    format_metrics,
    log_to_tensorboard,
    run_final_eval,
    write_eval,
)

__all__ = ["evaluate_shapes", "evaluate_workdir", "format_metrics", "log_to_tensorboard", "run_final_eval", "write_eval"]
