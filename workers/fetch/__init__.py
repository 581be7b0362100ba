"""The fetch stage: image bytes from a job's URL, every failure classified.

``types``: ``FetchResult`` and the ``Fetcher`` role the pipeline depends on. ``fetcher``:
``UrlFetcher`` (one fetcher per URL scheme) and ``FileFetcher`` (file://). ``http``:
http(s) under the SSRF guard (``url_guard``) and the byte cap. ``s3``: s3:// objects.
``unchanged``: images the index already holds skip decode and embedding.
"""
