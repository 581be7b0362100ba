"""Export a model to ONNX (what TensorRT builds engines from), with its card and twin.

    python -m workers.embed.onnx_export --model default --out models/default.onnx

writes ``default.onnx`` (batch dimension dynamic, image size fixed by the card),
``default.pt`` (TorchScript twin, so a worker without TensorRT runs the same model through
PyTorch) and ``default.card.json`` carrying the source model's id, so both files record
the same model id with every vector.
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from common.errors import ConfigError
from common.files import write_atomic
from common.observability.logging import get_logger
from workers.embed.model import LoadedModel, load_model
from workers.embed.model_card import ModelCard, card_path_for

_log = get_logger(__name__)

INPUT_NAME = "pixels"
# Not "embedding": the exporter names the value of an nn.Embedding that way, and a
# transformer's patch or position embedding would then clash with the graph output.
OUTPUT_NAME = "image_embedding"
_OPSET = 18


def export_onnx(
    module: nn.Module,
    path: str | Path,
    *,
    input_size: int,
    max_batch: int = 256,
) -> Path:
    """Write ``module`` as ONNX: input ``pixels`` [batch, 3, size, size] float32, normalised.

    nn.Modules go through the torch.export-based exporter; TorchScript modules, which that
    exporter cannot trace, through the TorchScript-based one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, input_size, input_size)
    # Per process: two workers exporting into one shared engine cache must not share it.
    scratch = target.with_name(f".{target.name}.{os.getpid()}.export")
    module = module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporter deprecation chatter, not actionable
            if isinstance(module, torch.jit.ScriptModule):
                torch.onnx.export(
                    module,
                    (example,),
                    str(scratch),
                    dynamo=False,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    opset_version=_OPSET,
                )
            else:
                batch = torch.export.Dim("batch", min=1, max=max_batch)
                program = torch.onnx.export(
                    module,
                    (example,),
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: batch},),
                    opset_version=_OPSET,
                    optimize=True,
                    verbose=False,
                )
                if program is None:
                    raise ConfigError("ONNX export produced no program")
                program.save(str(scratch))
        data = scratch.read_bytes()
    finally:
        scratch.unlink(missing_ok=True)
    _check(data, target)
    write_atomic(target, data)
    return target


def _check(data: bytes, target: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(onnx.load_from_string(data))
    except Exception as exc:  # onnx raises several unrelated types
        raise ConfigError(f"exported ONNX model {target} is invalid: {exc}") from exc


def export_model(loaded: LoadedModel, onnx_path: str | Path, *, max_batch: int = 256) -> ModelCard:
    """ONNX + TorchScript twin + card (with the source's model id) next to each other."""
    target = Path(onnx_path).with_suffix(".onnx")
    target.parent.mkdir(parents=True, exist_ok=True)
    module = loaded.require_module()
    export_onnx(module, target, input_size=loaded.card.input_size, max_batch=max_batch)
    twin = target.with_suffix(".pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = (
            module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module)
        )
        torch.jit.save(scripted, str(twin))
    card = replace(loaded.card, model_id=loaded.model_id)
    card.save(card_path_for(target))
    _log.info("model_exported", model_id=loaded.model_id, onnx=str(target), torchscript=str(twin))
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help='"default" or a TorchScript file')
    parser.add_argument("--out", required=True, help="the .onnx path to write")
    parser.add_argument("--max-batch", type=int, default=256)
    args = parser.parse_args(argv)
    card = export_model(load_model(args.model), args.out, max_batch=args.max_batch)
    print(f"exported {card.model_id} to {Path(args.out).with_suffix('.onnx')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
