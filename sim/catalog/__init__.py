"""Hardware and model catalog: GPU specifications and model architectures."""

from sim.catalog.gpus import GPUS, GpuSpec, get_gpu
from sim.catalog.models import MODEL_NAMES, ModelSpec, load_model, model_from_config

__all__ = ["GPUS", "MODEL_NAMES", "GpuSpec", "ModelSpec", "get_gpu", "load_model", "model_from_config"]
