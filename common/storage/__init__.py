"""Object storage: the ``Storage`` protocol (``base``) and its compare-and-swap (``cas``).

The adapters, ``local.LocalStorage`` and ``s3.S3Storage``, are named only by the
composition root (``imgfleet.factories``); ``s3_client`` is the one boto3 client factory,
which names no adapter. This package imports none of them.
"""
