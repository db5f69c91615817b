"""Inference engines turning images into FoL `Encoding`s (torch now; ONNX Runtime / TensorRT beside it)."""
from fol_ros.encode.base import Encoder, create_encoder

__all__ = ['Encoder', 'create_encoder']
