"""Inference speed of the served model: latency (p50/p99) and batch throughput of ONNX Runtime on it and
on a float32 export and of PyTorch eager (``--weights`` from ``train.py --save-dir``, or fresh weights); a 12 MP
JPEG end to end; ``python -m cifar predict`` on 1,000 PNGs with start-up (a ``models:/`` URI twice: resolved, cached).

    python benchmarks/inference.py [--model models/bundled] [--weights DIR] [--quick]
"""

import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from harness import ROOT, clock, label, parser, record
from PIL import Image

from cifar.contract.images import decode_image
from cifar.engine.models import create_model
from cifar.run import export
from cifar.run.export import ServedNet, export_served, load_weights, tta_of
from cifar.serve.inference import Predictor


def predict_cli(folder: str, model_uri: str, env: dict | None = None) -> float:
    """Seconds of one ``python -m cifar.serve.predict`` over ``folder``, start-up included."""
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


if __name__ == "__main__":
    p = parser(__doc__, quick="fewer repeats (under 2 minutes)")
    p.add_argument("--model", default=str(ROOT / "models" / "bundled"))
    p.add_argument("--weights", type=Path)
    args = p.parse_args()
    repeats, files, scratch = 30 if args.quick else 200, 1000, tempfile.TemporaryDirectory()
    few = max(5, repeats // 10)
    predictor = Predictor.from_uri(args.model)
    if args.weights:
        net, meta = load_weights(args.weights)
    else:
        meta, norm = predictor.metadata, predictor.metadata["normalization"]
        net = create_model(meta["model"], width=meta["width"], mean=norm["mean"], std=norm["std"])
    torch.set_grad_enabled(False)
    model = ServedNet(net.eval(), *tta_of(meta)).eval()  # eager: the network part of the served graph
    # the float32 served graph (as a training run logs it) with the served model's head constants
    float_meta = {k: v for k, v in {**predictor.metadata, **meta}.items() if k not in ("precision", "quantization")}
    served, float_path = export.constants_of(onnx.load(str(predictor.onnx_path))), f"{scratch.name}/float32.onnx"
    onnx.save(export_served(net, float_meta, served), float_path)
    runners = {
        "served": predictor.predict_arrays,
        "float32 ONNX": Predictor(Path(float_path)).predict_arrays,
        "eager": lambda x: model(torch.from_numpy(x)),
    }
    rng = np.random.default_rng(0)
    one, batch = rng.integers(0, 255, (1, 32, 32, 3), np.uint8), rng.integers(0, 255, (256, 32, 32, 3), np.uint8)
    figures = {"served precision": predictor.metadata.get("precision", "float32")}
    for name, run in runners.items():
        times = clock(lambda run=run: run(one), repeats, warmup=1)
        figures[f"{name} p50 ms"], figures[f"{name} p99 ms"] = np.percentile(times, [50, 99]) * 1000
    for name, run in runners.items():
        figures[f"{name} batch img/s"] = 256 / np.median(clock(lambda run=run: run(batch), few, warmup=1))
    y, x = np.mgrid[0:3000, 0:4000]  # a 12 MP photo-like image: smooth gradients (noise: an unrealistic JPEG)
    photo = np.stack([(x / 16) % 256, (y / 12) % 256, ((x + y) / 28) % 256], -1).astype(np.uint8)
    Image.fromarray(photo).save(jpeg := io.BytesIO(), format="JPEG", quality=90)
    times = clock(lambda: predictor.predict_arrays([decode_image(jpeg.getvalue())]), max(10, repeats // 5), warmup=1)
    figures["12 MP JPEG p50 ms"], figures["12 MP JPEG p99 ms"] = np.percentile(times, [50, 99]) * 1000
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(files):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(f"{tmp}/{i:04d}.png")
        # A registry URI runs twice on an empty model cache: the first call resolves it with MLflow,
        # the second reads the copy cifar.serve.modelcache kept (the store is unchanged in between).
        fresh_cache = {"CIFAR_MODEL_CACHE": str(Path(scratch.name) / "model-cache")}
        figures["predict CLI img/s"] = files / predict_cli(tmp, args.model, fresh_cache)
        if args.model.startswith("models:/"):
            figures["predict CLI next call img/s"] = files / predict_cli(tmp, args.model, fresh_cache)
        figures["predict CLI float32 img/s"] = files / predict_cli(tmp, float_path)
    scratch.cleanup()
    record(f"inference.{label(args.model)}", figures, write=not args.no_results)
