"""The ModelEmbedder's engine work: padding, chunks, instances, precision, threads, GPU paths.

GPU tests need CUDA (and TensorRT for the engine tests) and skip cleanly without; CI has
no GPU. Everything else runs the real model on the CPU.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.config import load_settings
from common.errors import ConfigError
from imgfleet.factories import embed_threads, embed_threads_for_cpu, make_embedder
from workers.decode.preprocess import Preprocess
from workers.embed.backends import (
    EngineOptions,
    powers_of_two_up_to,
    preferred_sizes,
    resolve_precision,
)
from workers.embed.embedder import ModelEmbedder, NonFiniteEmbeddingError, usable_cpus
from workers.embed.model import PLUMBING, LoadedModel, load_model
from workers.embed.model_card import ModelCard
from workers.embed.tensorrt import EngineKey, batch_profile, calibration_images, engine_path

has_cuda = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not has_cuda, reason="needs CUDA")


def _batch(n: int, seed: int = 0, size: int = 224) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def plain() -> ModelEmbedder:
    return ModelEmbedder(load_model(PLUMBING), threads=2)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_padding_to_preferred_sizes_changes_no_vector(plain: ModelEmbedder) -> None:
    padded = ModelEmbedder(
        load_model(PLUMBING),
        threads=2,
        options=EngineOptions(preferred_batch_sizes=(4, 8), max_batch=8),
    )
    batch = _batch(11, seed=1)
    np.testing.assert_allclose(padded.embed(batch), plain.embed(batch), atol=1e-5)
    # 11 rows -> chunks of 8 and 3 -> 3 padded up to 4.
    assert padded.stats.chunks == 2 and padded.stats.padded_rows == 1
    assert padded.stats.images == 11 and padded.stats.calls == 1


def test_without_preferred_sizes_the_cpu_pads_nothing(plain: ModelEmbedder) -> None:
    before = plain.stats.padded_rows
    assert plain.embed(_batch(5)).shape == (5, 256)
    assert plain.stats.padded_rows == before
    assert plain.preferred_batch_sizes == () and plain.backend == "torch"


def test_concurrent_calls_get_their_own_rows(plain: ModelEmbedder) -> None:
    batches = [_batch(3, seed=s) for s in range(4)]
    expected = [plain.embed(b) for b in batches]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = plain.embed(batches[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        np.testing.assert_allclose(results[i], expected[i], atol=1e-5)


class _Scaled(nn.Module):
    """Mean colour times a large factor: finite in fp32, overflowing in fp16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * 1e3


class _FakeHalf:
    """A reduced-precision engine stand-in: NaN for the rows a real fp16 run overflows on."""

    name = "fake-fp16"
    precision = "fp16"

    def __init__(self, bad_rows: set[int]) -> None:
        self.bad_rows = bad_rows

    def run(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        outs = []
        for chunk in chunks:
            out = chunk.reshape(len(chunk), -1, 3).mean(axis=1).astype(np.float32)
            out[[r for r in self.bad_rows if r < len(chunk)]] = np.nan
            outs.append(out)
        return outs


def _small_card() -> ModelCard:
    return ModelCard("scaled", preprocess=Preprocess(16), output_dim=3)


def test_non_finite_rows_are_rerun_in_fp32() -> None:
    embedder = ModelEmbedder(LoadedModel(_Scaled(), _small_card(), "scaled-1"), threads=1)
    embedder.precision = "fp16"  # as on a GPU
    embedder._instances.get()
    embedder._instances.put(_FakeHalf({1}))
    batch = _batch(3, size=16)
    vectors = embedder.embed(batch)
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    reference = embedder._reference_backend().run([batch[1:2]])[0][0]
    np.testing.assert_allclose(vectors[1], reference / np.linalg.norm(reference), atol=1e-5)
    assert embedder.stats.fp32_reruns == 1


class _NaNModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.mean(dim=(2, 3))
        out[0] = float("nan")
        return out


def test_rows_non_finite_in_fp32_are_refused_by_row() -> None:
    embedder = ModelEmbedder(LoadedModel(_NaNModel(), _small_card(), "nan-1"), threads=1)
    with pytest.raises(NonFiniteEmbeddingError) as info:
        embedder.embed(_batch(2, size=16))
    assert info.value.rows == [0] and info.value.transient
    assert embedder.stats.refused_rows == 1


def test_output_width_must_match_the_card() -> None:
    card = ModelCard("wrong", preprocess=Preprocess(16), output_dim=5)
    embedder = ModelEmbedder(LoadedModel(_Scaled(), card, "wrong-1"), threads=1)
    with pytest.raises(ConfigError, match="output_dim"):
        embedder.embed(_batch(2, size=16))


def test_precision_and_batch_size_choices() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", "torch", cpu) == ("fp32", "")
    assert resolve_precision("auto", "tensorrt", cuda) == ("fp16", "")
    assert resolve_precision("fp16", "torch", cpu)[0] == "fp32"
    assert resolve_precision("int8", "torch", cuda)[0] == "fp16"
    assert resolve_precision("int8", "tensorrt", cuda) == ("int8", "")
    assert resolve_precision("bf16", "torch", cpu) == ("bf16", "")
    assert powers_of_two_up_to(32) == (1, 2, 4, 8, 16, 32)
    assert powers_of_two_up_to(24) == (1, 2, 4, 8, 16, 24)
    card = ModelCard("c", output_dim=4, preferred_batch_sizes=(8, 64))
    assert preferred_sizes(EngineOptions(max_batch=32), card, cpu) == (8,)
    assert preferred_sizes(EngineOptions(max_batch=8, preferred_batch_sizes=(2,)), card, cpu) == (
        2,
    )
    plain_card = ModelCard("c", output_dim=4)
    assert preferred_sizes(EngineOptions(max_batch=4), plain_card, cpu) == ()
    assert preferred_sizes(EngineOptions(max_batch=4), plain_card, cuda) == (1, 2, 4)


def test_bf16_on_the_cpu_stays_close_to_fp32(plain: ModelEmbedder) -> None:
    bf16 = ModelEmbedder(load_model(PLUMBING), threads=2, options=EngineOptions(precision="bf16"))
    batch = _batch(4, seed=5)
    assert bf16.precision == "bf16"
    assert _cosines(bf16.embed(batch), plain.embed(batch)).min() >= 0.99


def test_embed_threads_follow_settings_and_the_machine() -> None:
    assert embed_threads_for_cpu(1, 1) == 1
    assert embed_threads_for_cpu(2, 2) == 2
    assert embed_threads_for_cpu(16, 16) == 8
    assert embed_threads_for_cpu(8, 2) == 6
    settings = load_settings(model={"threads": 3}, worker={"embed_threads": 1})
    assert embed_threads(settings, "cpu") == 3
    assert embed_threads(load_settings(worker={"embed_threads": 1}), "cpu") == 1
    # On a GPU the CPU side only stages batches: two threads, or fewer cores if that is all.
    assert embed_threads(load_settings(), "cuda") == min(2, usable_cpus())


def test_make_embedder_reads_the_model_section(tmp_path: Path) -> None:
    settings = load_settings(
        model={"device": "cpu", "preferred_batch_sizes": [16, 4, 4], "threads": 1},
        worker={"max_batch": 16},
    )
    assert settings.model.preferred_batch_sizes == [4, 16]
    embedder = make_embedder(settings)
    assert embedder.preferred_batch_sizes == (4, 16) and embedder.threads == 1
    assert embedder.embed(_batch(5)).shape == (5, 1280)  # the default: EfficientNet-Lite0
    with pytest.raises(ConfigError):
        load_settings(model={"preferred_batch_sizes": [0]})
    with pytest.raises(ConfigError):
        make_embedder(load_settings(model={"path": str(tmp_path / "missing.pt")}))


def test_engine_cache_key_separates_what_makes_engines_differ(tmp_path: Path) -> None:
    base = EngineKey("abc", "NVIDIA H100 80GB HBM3", "10.3.0", "fp16", 224, 1, 32, 32)
    others = [
        EngineKey("abd", base.gpu_name, "10.3.0", "fp16", 224, 1, 32, 32),
        EngineKey("abc", "NVIDIA A100-SXM4-40GB", "10.3.0", "fp16", 224, 1, 32, 32),
        EngineKey("abc", base.gpu_name, "10.4.0", "fp16", 224, 1, 32, 32),
        EngineKey("abc", base.gpu_name, "10.3.0", "int8", 224, 1, 32, 32),
        EngineKey("abc", base.gpu_name, "10.3.0", "fp16", 224, 1, 64, 64),
    ]
    paths = {engine_path(tmp_path, k) for k in [base, *others]}
    assert len(paths) == 6
    assert engine_path(tmp_path, base).name.startswith("nvidia-h100-80gb-hbm3-trt10.3.0-fp16-")
    assert engine_path(tmp_path, base) == engine_path(tmp_path, EngineKey(*vars(base).values()))
    with pytest.raises(ConfigError):
        EngineKey("abc", "gpu", "10", "fp8", 224, 1, 32, 32)
    with pytest.raises(ConfigError):
        EngineKey("abc", "gpu", "10", "fp16", 224, 4, 2, 32)
    assert batch_profile((1, 2, 4), 32) == (1, 32, 32)
    assert batch_profile((64,), 32) == (1, 64, 64)


def test_calibration_images_use_the_reference_preprocessing(tmp_path: Path) -> None:
    from PIL import Image

    from workers.decode.preprocess import reference_preprocess

    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    images = calibration_images(tmp_path, Preprocess(32), max_images=2)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    with Image.open(tmp_path / "0.png") as img:
        np.testing.assert_array_equal(images[0], reference_preprocess(img, Preprocess(32)))
    with pytest.raises(ConfigError):
        calibration_images(tmp_path / "none", Preprocess(32), 2)


# -- GPU ---------------------------------------------------------------------------------

# Stated tolerances against the fp32 CPU reference (cosine per vector).
FP32_GPU_MIN_COSINE = 0.999
FP16_MIN_COSINE = 0.995
TRT_FP16_MIN_COSINE = 0.99


@gpu
@needs_cuda
@pytest.mark.parametrize(
    ("precision", "floor"),
    [("fp32", FP32_GPU_MIN_COSINE), ("fp16", FP16_MIN_COSINE), ("bf16", 0.99)],
)
def test_gpu_runner_matches_the_cpu_reference(
    plain: ModelEmbedder, precision: str, floor: float
) -> None:
    embedder = ModelEmbedder(
        load_model(PLUMBING),
        device="cuda",
        options=EngineOptions(backend="torch", precision=precision, max_batch=16, in_flight=2),  # type: ignore[arg-type]
    )
    batch = _batch(37, seed=9)  # several chunks, the last one padded
    got = embedder.embed(batch)
    assert embedder.stats.chunks == 3 and embedder.stats.padded_rows == 3  # 16+16+5->8
    assert _cosines(got, plain.embed(batch)).min() >= floor


@gpu
@needs_cuda
def test_cuda_graphs_and_instances_give_the_same_vectors(plain: ModelEmbedder) -> None:
    embedder = ModelEmbedder(
        load_model(PLUMBING),
        device="cuda",
        options=EngineOptions(
            backend="torch", precision="fp16", max_batch=8, cuda_graphs=True, instances=2
        ),
    )
    assert embedder.instances == 2
    batch = _batch(8, seed=4)
    results: list[np.ndarray] = []
    threads = [
        threading.Thread(target=lambda: results.append(embedder.embed(batch))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reference = plain.embed(batch)
    for got in results:
        assert _cosines(got, reference).min() >= FP16_MIN_COSINE


@gpu
@needs_cuda
def test_tensorrt_engine_is_built_once_and_cached(plain: ModelEmbedder, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    options = EngineOptions(
        backend="tensorrt", precision="fp16", max_batch=16, engine_cache_dir=str(tmp_path)
    )
    first = ModelEmbedder(load_model(PLUMBING), device="cuda", options=options)
    assert first.backend == "tensorrt"
    engines = list(tmp_path.glob("*.engine"))
    assert len(engines) == 1
    built_at = engines[0].stat().st_mtime_ns
    second = ModelEmbedder(load_model(PLUMBING), device="cuda", options=options)
    assert engines[0].stat().st_mtime_ns == built_at  # loaded from the cache
    batch = _batch(13, seed=2)
    assert _cosines(second.embed(batch), plain.embed(batch)).min() >= TRT_FP16_MIN_COSINE


def test_the_backend_line_says_why_tensorrt_is_not_used() -> None:
    from structlog.testing import capture_logs

    from common.observability.logging import configure_logging

    configure_logging("console", "info")  # an earlier test may have raised the level
    with capture_logs() as logs:
        embedder = ModelEmbedder(load_model(PLUMBING), threads=1)
    (line,) = [e for e in logs if e["event"] == "embedding_backend"]
    assert line["log_level"] == "info" and line["backend"] == "torch"
    assert line["tensorrt"].startswith("device is cpu")
    assert embedder.fallback_reason == line["tensorrt"]
