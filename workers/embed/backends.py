"""Engine instances that run a model on uint8 NHWC chunks: PyTorch on CPU or GPU, ONNX
Runtime on CPU, TensorRT.

``open_backends`` picks what this machine can run and says so in one log line: TensorRT
when it is installed and there is a GPU; on a CPU, ONNX Runtime for an ONNX-only model and
for models that export cleanly (``LoadedModel.onnx_on_cpu``: the default runs 11x faster
there than in eager PyTorch, bench/embed.py); otherwise the same model through PyTorch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch
from torch import nn

from common.errors import ConfigError
from common.observability.logging import get_logger
from workers.embed.model import LoadedModel
from workers.embed.model_card import ModelCard
from workers.embed.tensorrt import normalise_nchw, tensorrt_status

if TYPE_CHECKING:
    from workers.embed.gpu_runner import GpuRunner

_log = get_logger(__name__)

BackendName = Literal["auto", "torch", "onnxruntime", "tensorrt"]
Precision = Literal["auto", "fp32", "fp16", "bf16", "int8"]
CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Backend(Protocol):
    """One engine instance. Not thread-safe; the ModelEmbedder hands each to one call at a time."""

    name: str
    precision: str

    def run(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 [n, H, W, 3] chunks -> float32 [n, dim] each (not necessarily unit-norm)."""
        ...


@dataclass(frozen=True)
class EngineOptions:
    backend: BackendName = "auto"
    precision: Precision = "auto"  # auto: fp16 on a GPU, fp32 on the CPU
    max_batch: int = 32  # largest chunk an instance runs (buffers, engine profile)
    preferred_batch_sizes: tuple[int, ...] = ()  # () : the card's, else per device
    instances: int = 1  # engine instances (GPU); concurrent embed() calls use them
    in_flight: int = 2  # chunks queued on one GPU instance at once
    channels_last: bool = True
    compile_mode: CompileMode = "none"
    cuda_graphs: bool = False
    engine_cache_dir: str = "imgfleet-data/engines"
    int8_calibration_dir: str = ""


@dataclass
class OpenedBackends:
    instances: list[Backend]
    backend: str  # what actually runs: "torch" or "tensorrt"
    precision: str
    preferred_batch_sizes: tuple[int, ...]
    fallback_reason: str  # why TensorRT is not used ("" when it is, or was not asked for)


def powers_of_two_up_to(limit: int) -> tuple[int, ...]:
    sizes = [1]
    while sizes[-1] * 2 <= limit:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != limit:
        sizes.append(limit)
    return tuple(sizes)


def resolve_precision(requested: str, backend: str, device: torch.device) -> tuple[str, str]:
    """(precision to run, note when it differs from the request)."""
    if requested == "auto":
        return ("fp16" if device.type == "cuda" else "fp32"), ""
    if requested == "int8" and backend != "tensorrt":
        fallback = "fp16" if device.type == "cuda" else "fp32"
        return fallback, f"int8 needs TensorRT; running {fallback}"
    if requested == "fp16" and device.type == "cpu":
        # CPU half-precision kernels are slower than fp32, not faster.
        return "fp32", "fp16 is not used on the CPU; running fp32"
    return requested, ""


def preferred_sizes(
    options: EngineOptions, card: ModelCard, device: torch.device
) -> tuple[int, ...]:
    """Batch sizes to pad to: configured, else the card's, else one set per device.

    On a GPU a few fixed shapes let cuDNN autotuning, CUDA graphs and engine profiles pay
    off once; on the CPU padding is only wasted work, so none.
    """
    chosen = options.preferred_batch_sizes or card.preferred_batch_sizes
    if not chosen and device.type == "cuda":
        chosen = powers_of_two_up_to(options.max_batch)
    return tuple(sorted({s for s in chosen if 1 <= s <= options.max_batch}))


def open_backends(
    loaded: LoadedModel, device: torch.device, options: EngineOptions
) -> OpenedBackends:
    sizes = preferred_sizes(options, loaded.card, device)
    reason = ""
    if options.backend == "tensorrt" or (options.backend == "auto" and device.type == "cuda"):
        usable, why = tensorrt_status()
        if usable and device.type == "cuda":
            precision, note = resolve_precision(options.precision, "tensorrt", device)
            try:
                engines = _tensorrt_instances(loaded, device, options, precision, sizes)
            except (ConfigError, RuntimeError) as exc:
                if options.backend == "tensorrt":
                    raise
                # auto: an engine that will not build (an op TensorRT lacks) must not keep
                # the worker down when PyTorch can run the same model.
                why = f"engine build failed: {exc}"
                _log.error("tensorrt engine unavailable; falling back to PyTorch", error=str(exc))
            else:
                _log.info(
                    "embedding_backend",
                    backend="tensorrt",
                    device=str(device),
                    precision=precision,
                    instances=len(engines),
                    note=note or why,
                )
                return OpenedBackends(engines, "tensorrt", precision, sizes, "")
        reason = why if device.type == "cuda" else f"device is {device}; TensorRT needs a GPU"
    elif options.backend == "torch":
        reason = "backend=torch configured"
    else:
        reason = f"device is {device}; {tensorrt_status()[1]}"
    if _wants_onnxruntime(loaded, options, device):
        return _onnxruntime_backends(loaded, device, options, sizes, reason)
    precision, note = resolve_precision(options.precision, "torch", device)
    module = loaded.require_module()
    count = max(1, options.instances) if device.type == "cuda" else 1
    if device.type == "cuda":
        # One converted copy shared by the instances (weights are read-only at inference);
        # the loaded module stays fp32 on the CPU as the reference the fallback runs.
        module = copy.deepcopy(module).to(device)
        if precision != "fp32":
            module = module.to(_DTYPES[precision])
    instances: list[Backend] = [
        _torch_instance(module, loaded.card, device, options, precision, sizes)
        for _ in range(count)
    ]
    # The one line that tells ops which engine runs and, if TensorRT was wanted, why not.
    log = _log.warning if options.backend == "tensorrt" else _log.info
    log(
        "embedding_backend",
        backend="torch",
        device=str(device),
        precision=precision,
        instances=count,
        compile=options.compile_mode,
        tensorrt=reason,
        note=note,
    )
    return OpenedBackends(instances, "torch", precision, sizes, reason)


def _wants_onnxruntime(loaded: LoadedModel, options: EngineOptions, device: torch.device) -> bool:
    if options.backend == "onnxruntime":
        return True
    if options.backend != "auto":
        return False
    if loaded.module is None:
        return True  # ONNX only, and TensorRT (tried first on a GPU) is not running it
    # torch.compile asked for: that is a PyTorch path.
    return device.type == "cpu" and loaded.onnx_on_cpu and options.compile_mode == "none"


def _onnxruntime_backends(
    loaded: LoadedModel,
    device: torch.device,
    options: EngineOptions,
    sizes: tuple[int, ...],
    tensorrt_reason: str,
) -> OpenedBackends:
    precision, note = resolve_precision(options.precision, "onnxruntime", torch.device("cpu"))
    if precision != "fp32":
        note = note or f"{precision} is not used with ONNX Runtime; running fp32"
        precision = "fp32"
    onnx_path = loaded.onnx_path or _export_for_engine(loaded, options)
    backend = OnnxRuntimeBackend(
        onnx_path, loaded.card, threads=torch.get_num_threads(), device=device
    )
    _log.info(
        "embedding_backend",
        backend="onnxruntime",
        device=str(device),
        providers=backend.providers,
        precision=precision,
        onnx=str(onnx_path),
        threads=backend.threads,
        tensorrt=tensorrt_reason,
        note=note,
    )
    return OpenedBackends([backend], "onnxruntime", precision, sizes, tensorrt_reason)


def _torch_instance(
    module: nn.Module,
    card: ModelCard,
    device: torch.device,
    options: EngineOptions,
    precision: str,
    sizes: tuple[int, ...],
) -> Backend:
    if device.type != "cuda":
        return TorchCpuBackend(
            module,
            card,
            precision=precision,
            channels_last=options.channels_last,
            compile_mode=options.compile_mode,
        )
    from workers.embed.gpu_runner import GpuRunner

    torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each once
    dtype = _DTYPES[precision]
    on_device = module
    if options.channels_last and not isinstance(module, torch.jit.ScriptModule):
        on_device = on_device.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    forward = _maybe_compile(on_device, options.compile_mode)
    runner = GpuRunner(
        forward,
        card,
        device=device,
        max_batch=options.max_batch,
        in_flight=options.in_flight,
        dtype=dtype,
        channels_last=options.channels_last,
        graph_batch_sizes=sizes if options.cuda_graphs else (),
    )
    return _RunnerBackend(runner, "torch-cuda", precision)


def _maybe_compile(module: nn.Module, compile_mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if compile_mode == "none":
        return module
    if isinstance(module, torch.jit.ScriptModule):
        _log.warning("torch.compile skipped: TorchScript modules cannot be compiled")
        return module
    # Fixed shapes (the preferred batch sizes) compile once each; dynamic=False keeps the
    # kernels specialised instead of generic over the batch dimension.
    compiled: Callable[[torch.Tensor], torch.Tensor] = torch.compile(
        module, mode=None if compile_mode == "default" else compile_mode, dynamic=False
    )
    return compiled


class TorchCpuBackend:
    """The PyTorch model on the CPU; intra-op threads are the process-wide setting."""

    name = "torch-cpu"

    def __init__(
        self,
        module: nn.Module,
        card: ModelCard,
        *,
        precision: str = "fp32",
        channels_last: bool = True,
        compile_mode: str = "none",
    ) -> None:
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision {precision} is not available on the CPU")
        self.precision = precision
        self.card = card
        self.module = module.eval()
        if channels_last and not isinstance(module, torch.jit.ScriptModule):
            self.module = self.module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._forward = _maybe_compile(self.module, compile_mode)

    def run(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        outs = []
        with torch.inference_mode():
            for chunk in chunks:
                if not chunk.flags.writeable:
                    # torch.from_numpy shares memory and warns ("The given NumPy array is
                    # not writable ...") on a read-only array, such as one decoded image
                    # (np.asarray of a Pillow image) that `imgfleet search --image` embeds.
                    # The tensor is only read, but a copy is the quiet way: 150 KB per
                    # 224x224 image, nothing beside the model's time.
                    chunk = chunk.copy()
                # NHWC -> NCHW as a view: the memory stays channels-last, which oneDNN
                # convolutions run fastest on.
                x = normalise_nchw(torch.from_numpy(chunk), self.card)
                if self.precision == "bf16":
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        out = self._forward(x)
                else:
                    out = self._forward(x)
                outs.append(out.float().numpy())
        return outs


class OnnxRuntimeBackend:
    """An ONNX graph through ONNX Runtime (input: normalised NCHW float32): the CPU
    provider, or on a GPU host with onnxruntime-gpu its TensorRT / CUDA providers.

    On the CPU, thread spinning is off: with it on, the model is 19% faster alone on 2 threads
    (255 vs 214 images/s) but its idle threads spin on the cores the decode processes
    need between batches.
    """

    name = "onnxruntime"
    precision = "fp32"

    def __init__(
        self,
        path: str | Path,
        card: ModelCard,
        *,
        threads: int,
        device: torch.device | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ConfigError(
                "ONNX models on the CPU need onnxruntime (pip install onnxruntime)"
            ) from exc
        self.card = card
        self.threads = max(1, threads)
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = self.threads
        session_options.inter_op_num_threads = 1
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = _ort_providers(ort.get_available_providers(), device)
        try:
            self._session = ort.InferenceSession(
                str(path), session_options, providers=self.providers
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ConfigError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(
                f"ONNX model {path} has {len(inputs)} inputs; one image input expected"
            )
        self._input = inputs[0].name
        shape = inputs[0].shape
        size = card.input_size
        if len(shape) != 4 or any(
            isinstance(v, int) and v != want
            for v, want in zip(shape[1:], (3, size, size), strict=True)
        ):
            raise ConfigError(
                f"ONNX model {path} takes input {shape}, but its card says [N, 3, {size}, {size}]"
            )

    def run(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        outs = []
        for chunk in chunks:
            x = normalise_nchw(torch.from_numpy(np.ascontiguousarray(chunk)), self.card)
            out = self._session.run(None, {self._input: x.contiguous().numpy()})[0]
            outs.append(np.asarray(out, dtype=np.float32))
        return outs


def _ort_providers(available: list[str], device: torch.device | None) -> list[str]:
    if device is None or device.type != "cuda":
        return ["CPUExecutionProvider"]
    gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    if not gpu:
        raise ConfigError(
            f"backend onnxruntime on {device} needs onnxruntime-gpu (providers here: "
            f"{', '.join(available)})"
        )
    return [*gpu, "CPUExecutionProvider"]


@dataclass
class _RunnerBackend:
    runner: GpuRunner
    name: str
    precision: str

    def run(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        return self.runner.run(chunks)


def _tensorrt_instances(
    loaded: LoadedModel,
    device: torch.device,
    options: EngineOptions,
    precision: str,
    sizes: tuple[int, ...],
) -> list[Backend]:
    from workers.embed.gpu_runner import GpuRunner
    from workers.embed.tensorrt import load_or_build

    onnx_path = loaded.onnx_path or _export_for_engine(loaded, options)
    engine = load_or_build(
        onnx_path,
        loaded.card,
        cache_dir=options.engine_cache_dir,
        precision=precision,
        preferred_batch_sizes=sizes,
        max_batch=options.max_batch,
        device=device,
        calibration_dir=options.int8_calibration_dir,
    )
    instances: list[Backend] = []
    for _ in range(max(1, options.instances)):
        context = engine.instance()
        runner = GpuRunner(
            context,
            loaded.card,
            device=device,
            max_batch=options.max_batch,
            in_flight=options.in_flight,
            dtype=torch.float32,  # the engine's input binding; it casts inside
            channels_last=False,  # TensorRT reads the contiguous NCHW the ONNX declares
        )
        instances.append(_RunnerBackend(runner, "tensorrt", precision))
    return instances


def _export_for_engine(loaded: LoadedModel, options: EngineOptions) -> Path:
    """The default (or a TorchScript-only) model exported once into the engine cache."""
    from workers.embed.onnx_export import export_onnx

    target = Path(options.engine_cache_dir) / "onnx" / f"{loaded.model_id}.onnx"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(
            loaded.require_module(),
            target,
            input_size=loaded.card.input_size,
            max_batch=max(options.max_batch, 256),
        )
    return target
