"""oncolake: raw cancer images to Delta tables, tensors, CNNs and predictions."""

__version__ = "0.1.0"
