"""Fixtures that run the real pipeline: a generated corpus behind a loopback HTTP server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imgfleet.demo.corpus import make_corpus
from imgfleet.demo.image_server import ImageServer
from tests.support.fleet import Fleet


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    corpus = make_corpus(tmp_path / "corpus", 48, seed=7)
    with ImageServer(corpus.root) as server:
        catalogue = corpus.write_catalogue_jsonl(tmp_path / "catalogue.jsonl", server.base_url)
        yield Fleet(tmp_path, corpus, server.base_url, catalogue)
