"""Setting defaults that processes without the settings model need.

A decode pool process imports the decoders and nothing heavier: importing the pydantic
settings model there added 0.18 s to every pool process start (0.27 s -> 0.45 s per
`import workers.decode.pool`, measured here), which showed as a ~13% slower
`bench/pipeline.py --quick`. ``common.config`` takes these values as its defaults, so each
is still defined once.
"""

from __future__ import annotations

MAX_PIXELS = 50_000_000  # worker.max_pixels
DECODE_POOL_MAX_RESTARTS = 20  # worker.decode_pool_max_restarts
# worker.decode_timeout_s: a 50-megapixel progressive JPEG takes about 2 s on one loaded
# core; a decoder still busy after 30 s is stuck on its input.
DECODE_TIMEOUT_S = 30.0
