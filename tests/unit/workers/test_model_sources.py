"""Model cards, ONNX export and its TorchScript twin, and models read from s3://."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from common.errors import ConfigError
from tests.conftest import s3_client
from tests.support.models import save_plumbing_as_torchscript
from workers.embed.backends import EngineOptions
from workers.embed.embedder import ModelEmbedder
from workers.embed.model import PLUMBING, load_model
from workers.embed.model_card import ModelCard, card_path_for
from workers.embed.model_sources import parse_s3_model_url, resolve_model_path
from workers.embed.onnx_export import INPUT_NAME, export_model, export_onnx
from workers.embed.plumbing import PlumbingCNN

BUCKET = "models"


def _batch(n: int, seed: int = 0, size: int = 224) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_card_carries_batch_sizes_and_model_id(tmp_path: Path) -> None:
    card = ModelCard("m", output_dim=8, preferred_batch_sizes=(8, 16), model_id="m-abc")
    path = card_path_for(tmp_path / "m.onnx")
    card.save(path)
    assert ModelCard.load(path) == card
    # Cards written before these fields existed still load.
    path.write_text('{"name": "old", "output_dim": 4}')
    old = ModelCard.load(path)
    assert old.preferred_batch_sizes == () and old.model_id == ""
    with pytest.raises(ConfigError):
        ModelCard("m", output_dim=8, preferred_batch_sizes=(0,))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    onnx_path = tmp_path_factory.mktemp("export") / "plumbing.onnx"
    export_model(load_model(PLUMBING), onnx_path, max_batch=64)
    return onnx_path


def test_export_writes_onnx_twin_and_card_with_the_source_id(exported: Path) -> None:
    source = load_model(PLUMBING)
    assert exported.is_file() and exported.with_suffix(".pt").is_file()
    card = ModelCard.load(card_path_for(exported))
    assert card.model_id == source.model_id and card.output_dim == 256
    # Both files record the source's id, whichever one a worker is configured with.
    from_onnx = load_model(str(exported))
    from_twin = load_model(str(exported.with_suffix(".pt")))
    assert from_onnx.model_id == from_twin.model_id == source.model_id
    assert from_onnx.onnx_path == exported and from_onnx.module is not None
    assert from_twin.onnx_path == exported


def test_onnx_graph_matches_pytorch_at_any_batch_size(exported: Path) -> None:
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(exported))
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert model.graph.input[0].name == INPUT_NAME and batch_dim.dim_param  # dynamic batch
    evaluator = ReferenceEvaluator(model)
    module = PlumbingCNN()
    for n in (1, 3):
        x = torch.from_numpy(np.random.default_rng(n).standard_normal((n, 3, 224, 224)))
        x = x.float()
        outputs = evaluator.run(None, {INPUT_NAME: x.numpy()})
        assert isinstance(outputs, list)
        got = outputs[0]
        with torch.inference_mode():
            expected = module(x).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_torchscript_exports_through_the_legacy_exporter(tmp_path: Path) -> None:
    import onnx

    script_path = tmp_path / "ts.pt"
    save_plumbing_as_torchscript(script_path)
    target = export_onnx(
        load_model(str(script_path)).require_module(), tmp_path / "ts.onnx", input_size=64
    )
    onnx.checker.check_model(onnx.load(str(target)))


def test_onnx_model_falls_back_to_pytorch_with_a_log_line(exported: Path) -> None:
    reference = ModelEmbedder(load_model(PLUMBING), threads=1).embed(_batch(3))
    with capture_logs() as logs:
        embedder = ModelEmbedder(
            load_model(str(exported)), threads=1, options=EngineOptions(backend="tensorrt")
        )
    assert embedder.backend == "torch" and embedder.precision == "fp32"
    lines = [e for e in logs if e["event"] == "embedding_backend"]
    assert lines and lines[0]["log_level"] == "warning" and "TensorRT" in lines[0]["tensorrt"]
    np.testing.assert_allclose(embedder.embed(_batch(3)), reference, atol=1e-5)


def test_onnx_without_card_or_twin(tmp_path: Path, exported: Path) -> None:
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(exported.read_bytes())
    with pytest.raises(ConfigError, match="card"):
        load_model(str(lonely))
    ModelCard.load(card_path_for(exported)).save(card_path_for(lonely))
    loaded = load_model(str(lonely))
    assert loaded.module is None
    # ONNX only: the CPU runs it through ONNX Runtime, and gets the source model's vectors.
    embedder = ModelEmbedder(loaded, threads=1)
    assert embedder.backend == "onnxruntime" and embedder.model_id == loaded.model_id
    reference = ModelEmbedder(
        load_model(PLUMBING), threads=1, options=EngineOptions(backend="torch")
    )
    np.testing.assert_allclose(embedder.embed(_batch(3)), reference.embed(_batch(3)), atol=1e-5)
    # PyTorch asked for explicitly, with no module to run: a clear refusal.
    with pytest.raises(ConfigError, match="TorchScript twin"):
        ModelEmbedder(loaded, threads=1, options=EngineOptions(backend="torch"))


def test_local_paths_resolve_and_missing_ones_are_config_errors(tmp_path: Path) -> None:
    assert resolve_model_path("default", cache_dir=tmp_path) == "default"
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    assert resolve_model_path(str(model), cache_dir=tmp_path) == str(model)
    with pytest.raises(ConfigError):
        resolve_model_path(str(tmp_path / "nope.pt"), cache_dir=tmp_path)
    for bad in ("s3://", "s3://bucket", "s3://bucket/dir/"):
        with pytest.raises(ConfigError):
            parse_s3_model_url(bad)
    assert parse_s3_model_url("s3://b/a/m.onnx").key == "a/m.onnx"


@pytest.fixture(scope="module")
def models_bucket(s3_endpoint: str) -> object:
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    return client


def test_s3_model_downloads_with_card_and_twin_and_is_cached(
    models_bucket: object, exported: Path, tmp_path: Path
) -> None:
    client = models_bucket
    for suffix in (".onnx", ".pt", ".card.json"):
        source = exported.with_suffix(suffix) if suffix != ".card.json" else card_path_for(exported)
        client.put_object(Bucket=BUCKET, Key=f"prod/default{suffix}", Body=source.read_bytes())  # type: ignore[attr-defined]
    cache = tmp_path / "cache"
    local = resolve_model_path("s3://models/prod/default.onnx", cache_dir=cache, s3_client=client)
    loaded = load_model(local)
    assert loaded.model_id == load_model(PLUMBING).model_id and loaded.module is not None
    assert Path(local).with_suffix(".pt").is_file()
    # Unchanged object: the same cache entry, nothing fetched again.
    Path(local).with_suffix(".pt").unlink()
    again = resolve_model_path("s3://models/prod/default.onnx", cache_dir=cache, s3_client=client)
    assert again == local and not Path(local).with_suffix(".pt").exists()
    # A replaced object has a new ETag: fetched into a new entry.
    client.put_object(Bucket=BUCKET, Key="prod/default.onnx", Body=exported.read_bytes() + b"\0")  # type: ignore[attr-defined]
    replaced = resolve_model_path(
        "s3://models/prod/default.onnx", cache_dir=cache, s3_client=client
    )
    assert replaced != local and Path(replaced).with_suffix(".pt").is_file()
    with pytest.raises(ConfigError, match="cannot be read"):
        resolve_model_path("s3://models/prod/missing.onnx", cache_dir=cache, s3_client=client)


def test_model_names_pass_through_as_names(tmp_path: Path) -> None:
    for name in ("plumbing", "efficientnet-lite0", "timm:resnet18.a1_in1k", "hf:org/repo"):
        assert resolve_model_path(name, cache_dir=tmp_path) == name
    assert resolve_model_path("open_clip:ViT-B-32/laion2b_s34b_b79k", cache_dir=tmp_path)
