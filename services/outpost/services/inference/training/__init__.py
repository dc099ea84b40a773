"""Training the committed inference models: simulator data sets, the ONNX graph, the training script."""
