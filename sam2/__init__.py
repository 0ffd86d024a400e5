"""Our own SAM2.1 image model (image path only).

Module paths and parameter names follow the official ``sam2`` package, so official Hydra
configs resolve and official SAM2.1 checkpoints load unchanged. Build a model with
:func:`sam2.build_sam.build_sam2`; predict masks with
:class:`sam2.sam2_image_predictor.SAM2ImagePredictor`.
"""
