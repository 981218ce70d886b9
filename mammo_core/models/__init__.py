"""The networks: architectures by name (`architectures`), EfficientNet-Lite0 and its ImageNet weights
(`efficientnet_lite`, `pth_reader`), and paper-cnn's faster equivalent training computation (`fast_training`)."""
