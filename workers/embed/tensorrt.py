"""TensorRT engines: build from ONNX (FP16, BF16, or INT8 with calibration), cache on disk.

An engine is only valid for the GPU model and TensorRT version that built it, and building
one takes minutes, so engines are cached under a key of (model hash, GPU name, TensorRT
version, precision, input size, batch profile). Workers sharing a host share the cache; a
file lock keeps two of them from building the same engine at once.

TensorRT is optional (the ``gpu`` extra). Without it, or without a GPU, callers fall back
to PyTorch; ``tensorrt_status`` says why, for the log line.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import ConfigError
from common.files import write_atomic
from common.observability.logging import get_logger
from workers.decode.types import Preprocess
from workers.embed.model_card import ModelCard

_log = get_logger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
_WORKSPACE_BYTES = 4 << 30
_CALIBRATION_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def tensorrt_status() -> tuple[bool, str]:
    """(usable, why): TensorRT importable and a CUDA device present."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "tensorrt is not installed (pip install 'imgfleet[gpu]')"
    except Exception as exc:  # a broken install (missing libnvinfer) raises other types
        return False, f"tensorrt failed to import: {exc}"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, f"tensorrt {trt.__version__}"


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine's validity depends on."""

    model_sha256: str
    gpu_name: str
    trt_version: str
    precision: str
    input_size: int
    min_batch: int
    opt_batch: int
    max_batch: int

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"TensorRT precision must be one of {PRECISIONS}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError("TensorRT batch profile needs 1 <= min <= opt <= max")

    def digest(self) -> str:
        text = "|".join(
            str(v)
            for v in (
                self.model_sha256,
                self.gpu_name,
                self.trt_version,
                self.precision,
                self.input_size,
                self.min_batch,
                self.opt_batch,
                self.max_batch,
            )
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def filename(self) -> str:
        # Readable prefix for people listing the cache; the digest makes it unique.
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu_name).strip("-").lower() or "gpu"
        return f"{gpu}-trt{self.trt_version}-{self.precision}-{self.digest()[:16]}.engine"


def engine_path(cache_dir: str | Path, key: EngineKey) -> Path:
    return Path(cache_dir) / key.filename()


def batch_profile(preferred_batch_sizes: tuple[int, ...], max_batch: int) -> tuple[int, int, int]:
    """(min, opt, max) for the engine's optimisation profile: tuned for the largest batch."""
    largest = max((*preferred_batch_sizes, max_batch))
    return 1, largest, largest


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def calibration_images(
    directory: str | Path, preprocess: Preprocess, max_images: int
) -> np.ndarray:
    """Up to ``max_images`` images from a directory, through the one preprocessing definition.

    INT8 ranges are only as good as the images they were measured on: use a sample of the
    real catalogue, a few hundred images.
    """
    from PIL import Image, UnidentifiedImageError

    from workers.decode.preprocess import reference_preprocess

    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"INT8 calibration directory {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _CALIBRATION_SUFFIXES)
    arrays: list[np.ndarray] = []
    for file in files:
        if len(arrays) >= max_images:
            break
        try:
            with Image.open(file) as img:
                arrays.append(reference_preprocess(img, preprocess))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            _log.warning("calibration image skipped", path=str(file), error=str(exc))
    if not arrays:
        raise ConfigError(f"no readable calibration images in {root}")
    return np.stack(arrays)


def normalise_nchw(
    batch: torch.Tensor, card: ModelCard, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 NHWC -> normalised NCHW (a channels-last view), as every backend feeds models."""
    std = torch.tensor(card.std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    mean = torch.tensor(card.mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    x = batch.permute(0, 3, 1, 2).float() * (1.0 / (255.0 * std)) + (-mean / std)
    return x.to(dtype)


def _make_calibrator(images: np.ndarray, card: ModelCard, cache_file: Path, batch_size: int) -> Any:
    import tensorrt as trt

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._next = 0
            self._current: torch.Tensor | None = None  # kept alive while TensorRT reads it

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._next + batch_size > len(images):
                return None
            chunk = images[self._next : self._next + batch_size]
            self._next += batch_size
            pixels = torch.from_numpy(chunk).cuda()
            self._current = normalise_nchw(pixels, card).contiguous()
            return [int(self._current.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            write_atomic(cache_file, bytes(cache))

    return _Calibrator()


def build_engine(
    onnx_path: Path,
    key: EngineKey,
    card: ModelCard,
    *,
    calibration: np.ndarray | None = None,
    calibration_cache: Path | None = None,
) -> bytes:
    """Parse the ONNX file and build a serialized engine for ``key``'s precision and profile."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _WORKSPACE_BYTES)
    if key.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # INT8 layers without a fast kernel fall to FP16
    if key.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    size = key.input_size
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise ConfigError(
            f"{onnx_path} has {network.num_inputs} inputs and {network.num_outputs} outputs; "
            "an image model has one of each"
        )
    profile = builder.create_optimization_profile()
    # By position, not by name: a user's ONNX file names its tensors as it likes.
    profile.set_shape(
        network.get_input(0).name,
        (key.min_batch, 3, size, size),
        (key.opt_batch, 3, size, size),
        (key.max_batch, 3, size, size),
    )
    config.add_optimization_profile(profile)
    if key.precision == "int8":
        if calibration is None or calibration_cache is None:
            raise ConfigError("INT8 needs calibration images (model.int8_calibration_dir)")
        config.set_flag(trt.BuilderFlag.INT8)
        calibration_batch = min(key.opt_batch, len(calibration))
        config.int8_calibrator = _make_calibrator(
            calibration, card, calibration_cache, calibration_batch
        )
        config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConfigError(f"TensorRT failed to build an engine from {onnx_path}")
    return bytes(serialized)


class TrtEngine:
    """A deserialized engine; each ``TrtInstance`` is one execution context on it."""

    def __init__(self, serialized: bytes, key: EngineKey, device: torch.device) -> None:
        import tensorrt as trt

        self.key = key
        self.device = device
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(serialized)
        if self.engine is None:
            raise ConfigError("TensorRT could not deserialize the engine")

    def instance(self) -> TrtInstance:
        return TrtInstance(self)


class TrtInstance:
    """One execution context: callable on a normalised float32 NCHW CUDA tensor."""

    def __init__(self, engine: TrtEngine) -> None:
        self.engine = engine
        with torch.cuda.device(engine.device):
            self.context = engine.engine.create_execution_context()
        if self.context is None:
            raise ConfigError("TensorRT could not create an execution context")
        names = [engine.engine.get_tensor_name(i) for i in range(engine.engine.num_io_tensors)]
        inputs = [n for n in names if _is_input(engine.engine, n)]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ConfigError(f"TensorRT engine has inputs {inputs} and outputs {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()  # the ONNX input is float32 NCHW, contiguous
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(out_shape, dtype=torch.float32, device=x.device)
        self.context.set_tensor_address(self.input_name, int(x.data_ptr()))
        self.context.set_tensor_address(self.output_name, int(out.data_ptr()))
        # Runs on the caller's current stream, so it orders with the copies around it.
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out


def _is_input(engine: Any, name: str) -> bool:
    import tensorrt as trt

    return bool(engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT)


def load_or_build(
    onnx_path: Path,
    card: ModelCard,
    *,
    cache_dir: str | Path,
    precision: str,
    preferred_batch_sizes: tuple[int, ...],
    max_batch: int,
    device: torch.device,
    calibration_dir: str = "",
    calibration_images_max: int = 512,
) -> TrtEngine:
    """The cached engine for this model, GPU and TensorRT version; built once if missing."""
    import tensorrt as trt

    from workers.embed.model import file_sha256

    min_b, opt_b, max_b = batch_profile(preferred_batch_sizes, max_batch)
    key = EngineKey(
        model_sha256=file_sha256(onnx_path),
        gpu_name=torch.cuda.get_device_name(device),
        trt_version=str(trt.__version__),
        precision=precision,
        input_size=card.input_size,
        min_batch=min_b,
        opt_batch=opt_b,
        max_batch=max_b,
    )
    path = engine_path(cache_dir, key)
    with _build_lock(path):
        if path.is_file():
            try:
                engine = TrtEngine(path.read_bytes(), key, device)
                _log.info("tensorrt_engine_cached", path=str(path), precision=precision)
                return engine
            except ConfigError as exc:
                # A truncated or foreign file: build again rather than refuse to start.
                _log.warning("tensorrt engine cache unreadable; rebuilding", error=str(exc))
        _log.info(
            "tensorrt_engine_build",
            onnx=str(onnx_path),
            precision=precision,
            gpu=key.gpu_name,
            batch_profile=(min_b, opt_b, max_b),
            note="takes minutes, once per model, GPU model and TensorRT version",
        )
        calibration = None
        if precision == "int8":
            calibration = calibration_images(
                calibration_dir, card.preprocess, calibration_images_max
            )
        serialized = build_engine(
            onnx_path,
            key,
            card,
            calibration=calibration,
            calibration_cache=path.with_suffix(".calib"),
        )
        write_atomic(path, serialized)
    return TrtEngine(serialized, key, device)
