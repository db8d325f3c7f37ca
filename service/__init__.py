"""endofuse: calibrated multimodal diagnosis inference over ONNX Runtime."""

__version__ = "0.1.0"
