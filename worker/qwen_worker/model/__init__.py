"""The served model: loading (loading.py), engine construction and warm-up (building.py), sentiment
scoring (sentiment.py)."""
from .loading import DEMO_MARKER, STAND_IN_MARKER, ModelService, ServedModel, model_key, resolve_device, resolve_dtype

__all__ = ["DEMO_MARKER", "STAND_IN_MARKER", "ModelService", "ServedModel", "model_key", "resolve_device",
           "resolve_dtype"]
