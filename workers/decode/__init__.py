"""The decode stage: image bytes to a preprocessed RGB array, every failure classified.

``types``: ``DecodeResult`` and the ``Decoder`` role the pipeline depends on. ``cpu``:
``decode_image``, the CPU path per format. ``pool``: ``DecodePool``, CPU decode in
processes that may crash; ``parent_watch``: how those processes exit when the worker
dies. ``nvjpeg``: the GPU JPEG decoder and the JPEG header checks.
``routing``: ``DecodeRouter`` (CPU or GPU, per image) and ``RoutedDecoder`` (the GPU in
front of the pool). ``preprocess``: the one resize and crop every path ends in.
``limits``: the pool's sizing, for callers that must not import a decoder.
"""
