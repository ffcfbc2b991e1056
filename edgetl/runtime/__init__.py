"""What an app embeds: numpy + tokenizers + ONNX Runtime or OpenVINO. Never imports torch."""

from edgetl.runtime.classifier import Prediction, TextClassifier

__all__ = ["Prediction", "TextClassifier"]
