"""Inference speed of the served model, side by side in one run (not part of the tests).

    python benchmarks/inference.py [--model models/bundled] [--weights DIR] [--quick]

- single-image latency (p50/p99) and batch throughput: ONNX Runtime on the served model (the
  bundled one is int8) against ONNX Runtime on a float32 export and PyTorch eager (on the same
  weights with ``--weights``: safetensors from ``train.py --save-dir``; without it, a model of the
  same architecture with fresh weights: same cost);
- end to end for a 12-megapixel JPEG photo (decode at reduced size, resize, predict);
- ``python -m cifar predict`` on 1,000 PNG files, start-up included (served model and float32; a
  ``models:/`` URI twice: the first call resolves it with MLflow, the next reads the local copy).
Appends its figures to benchmarks/RESULTS.md with the machine named.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import machine_name  # noqa: E402

from cifar.serve.inference import Predictor  # noqa: E402
from cifar.serve.preprocess import decode_image  # noqa: E402


def percentiles(times: list[float]) -> tuple[float, float]:
    return float(np.percentile(times, 50) * 1000), float(np.percentile(times, 99) * 1000)


def time_calls(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def torch_model(predictor: Predictor, weights: Path | None):
    import torch

    from cifar.models import create_model
    from cifar.run.export import load_weights

    if weights:
        model, meta = load_weights(weights)
    else:
        meta = predictor.metadata
        norm = meta["normalization"]
        model = create_model(meta["model"], width=meta["width"], mean=norm["mean"], std=norm["std"])
    torch.set_grad_enabled(False)
    return model.eval(), meta


def float_onnx(model, meta: dict, served: Path, folder: Path) -> Path:
    """The float32 served graph of ``model`` (as a training run logs it), with the head constants of ``served``."""
    import onnx

    from cifar.run.export import export_served
    from cifar.serve import contract

    meta = {k: v for k, v in meta.items() if k not in ("precision", "quantization")}
    path = folder / "float32.onnx"
    onnx.save(export_served(model, meta, contract.constants_of(onnx.load(str(served)))), str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "bundled"))
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (under 2 minutes)")
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    repeats, files = (30, 1000) if args.quick else (200, 1000)

    import torch

    from cifar.run.export import ServedNet, tta_of

    scratch = tempfile.TemporaryDirectory()
    predictor = Predictor.from_uri(args.model)
    raw_model, meta = torch_model(predictor, args.weights)
    model = ServedNet(raw_model, *tta_of(meta)).eval()  # eager: the network part of the served graph
    float_path = float_onnx(raw_model, {**predictor.metadata, **meta}, predictor.onnx_path, Path(scratch.name))
    float_predictor = Predictor(float_path)
    precision = predictor.metadata.get("precision", "float32")
    rng = np.random.default_rng(0)
    one = rng.integers(0, 255, (1, 32, 32, 3), np.uint8)
    batch = rng.integers(0, 255, (256, 32, 32, 3), np.uint8)
    to_tensor = torch.from_numpy
    onnx_p50, onnx_p99 = percentiles(time_calls(lambda: predictor.predict_arrays(one), repeats))
    float_p50, float_p99 = percentiles(time_calls(lambda: float_predictor.predict_arrays(one), repeats))
    torch_p50, torch_p99 = percentiles(time_calls(lambda: model(to_tensor(one)), repeats))
    few = max(5, repeats // 10)
    onnx_batch = 256 / np.median(time_calls(lambda: predictor.predict_arrays(batch), few))
    float_batch = 256 / np.median(time_calls(lambda: float_predictor.predict_arrays(batch), few))
    torch_batch = 256 / np.median(time_calls(lambda: model(to_tensor(batch)), few))

    from PIL import Image

    # A 12 MP photo-like image: smooth gradients and shapes (random noise would be an unrealistic JPEG).
    y, x = np.mgrid[0:3000, 0:4000]
    photo = np.stack([(x / 16) % 256, (y / 12) % 256, ((x + y) / 28) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    e2e_p50, e2e_p99 = percentiles(
        time_calls(lambda: predictor.predict_arrays([decode_image(jpeg)]), max(10, repeats // 5))
    )

    def predict_cli(folder: str, model_uri: str, env: dict | None = None) -> float:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "cifar.serve.predict", folder, "--model-uri", model_uri, "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(files):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(f"{tmp}/{i:04d}.png")
        # A registry URI runs twice on an empty model cache: the first call resolves it with MLflow,
        # the second reads the copy cifar.serve.modelcache kept (the store is unchanged in between).
        fresh_cache = {"CIFAR_MODEL_CACHE": str(Path(scratch.name) / "model-cache")}
        cli_seconds = predict_cli(tmp, args.model, fresh_cache)
        cli_warm_seconds = predict_cli(tmp, args.model, fresh_cache) if args.model.startswith("models:/") else None
        cli_float_seconds = predict_cli(tmp, str(float_path))
    scratch.cleanup()

    machine = machine_name()
    served = f"ONNX Runtime {precision} (served)"
    lines = [
        f"single image (32x32, incl. preprocessing): {served} p50 {onnx_p50:.2f} ms / p99 {onnx_p99:.2f} ms; "
        f"ONNX Runtime float32 p50 {float_p50:.2f} / p99 {float_p99:.2f} ms; "
        f"PyTorch eager p50 {torch_p50:.2f} ms / p99 {torch_p99:.2f} ms "
        f"(ratios: {float_p50 / onnx_p50:.2f}x vs float32 ONNX, {torch_p50 / onnx_p50:.2f}x vs eager)",
        f"batch of 256: {served} {onnx_batch:,.0f} img/s; ONNX Runtime float32 {float_batch:,.0f} img/s; "
        f"PyTorch eager {torch_batch:,.0f} img/s "
        f"(ratios: {onnx_batch / float_batch:.2f}x vs float32 ONNX, {onnx_batch / torch_batch:.2f}x vs eager)",
        f"12-megapixel JPEG end to end (decode with draft, resize, predict): "
        f"p50 {e2e_p50:.1f} ms / p99 {e2e_p99:.1f} ms",
        f"python -m cifar predict on {files} PNG files, start-up included: {precision} {cli_seconds:.2f} s = "
        f"{files / cli_seconds:,.0f} images/s; float32 {cli_float_seconds:.2f} s = "
        f"{files / cli_float_seconds:,.0f} images/s (ratio {cli_float_seconds / cli_seconds:.2f}x)",
    ]
    if cli_warm_seconds is not None:
        lines[-1] = (
            f"python -m cifar predict on {files} PNG files, start-up included, {precision}: first call (MLflow "
            f"resolves the URI) {cli_seconds:.2f} s = {files / cli_seconds:,.0f} images/s; next call (local copy, "
            f"store unchanged) {cli_warm_seconds:.2f} s = {files / cli_warm_seconds:,.0f} images/s "
            f"(ratio {cli_seconds / cli_warm_seconds:.2f}x); a float32 file {cli_float_seconds:.2f} s = "
            f"{files / cli_float_seconds:,.0f} images/s"
        )
    print(f"model {args.model} on {machine}")
    for line in lines:
        print(" ", line)
    if not args.no_results:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(
                f"\n### Inference ({date.today()}, {machine}, `{Path(args.model).name}`, "
                f"`{shlex.join(['python', 'benchmarks/inference.py', *sys.argv[1:]])}`)\n\n"
            )
            f.writelines(f"- {line}\n" for line in lines)


if __name__ == "__main__":
    main()
