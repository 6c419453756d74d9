"""The laptop shape's one model process: Embedder and Captioner contracts on one port,
the lite backends sharing one EfficientNet-Lite0 and its model threads (see app.py)."""
