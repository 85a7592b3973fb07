"""The offline default: a small CLIP pair and a small LLaVA trained on the ``shapes`` benchmark."""
