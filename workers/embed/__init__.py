"""The embed stage: batches of preprocessed images to unit vectors, on the best engine here.

``types``: the ``Embedder`` role the pipeline depends on. ``embedder``: ``ModelEmbedder``
(chunks, padding, normalisation, the fp32 rerun). ``backends``: engine instances (PyTorch
on CPU or GPU, TensorRT), ``gpu_runner`` keeping one GPU busy and ``tensorrt`` building
and caching engines. ``model``, ``model_card``, ``model_sources``: the model, what it
expects, where it comes from; ``onnx_export`` and ``model_zoo`` for exports and benchmarks.
"""
