"""Export: ONNX now; fp16 / int8 / Triton / TorchServe build on it."""
