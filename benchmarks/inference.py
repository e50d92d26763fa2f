"""Inference speed of the served model: p50/p99 latency and batch img/s of ONNX Runtime on it and on a float32
export and of PyTorch eager (``--weights`` from ``train.py --save-dir``, or fresh ones); a 12 MP JPEG end to end;
``cifar.serve.predict`` on 1,000 PNGs, start-up included (a ``models:/`` URI twice: resolved, then cached).

    python benchmarks/inference.py [--model models/bundled] [--weights DIR] [--quick]
"""

import io
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from harness import ROOT, clock, parser, record, timed
from PIL import Image

from cifar.contract.images import decode_image
from cifar.engine.models import create_model
from cifar.run import export
from cifar.serve.inference import Predictor


def predict_cli(folder: str, model_uri: str, env: dict) -> float:
    """Images/s of one ``python -m cifar.serve.predict`` over the 1,000 files in ``folder``, start-up included."""
    cmd = [sys.executable, "-m", "cifar.serve.predict", folder, "--model-uri", model_uri, "--json"]
    done, seconds = timed(subprocess.run, cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return 1000 / seconds


def latency(name: str, fn, repeats: int) -> dict[str, float]:
    """p50 and p99 milliseconds of ``repeats`` calls of ``fn`` after one."""
    p50, p99 = np.percentile(clock(fn, repeats, warmup=1), [50, 99]) * 1000
    return {f"{name} p50 ms": p50, f"{name} p99 ms": p99}


if __name__ == "__main__":
    p = parser(__doc__, quick="fewer repeats")
    p.add_argument("--model", default=str(ROOT / "models" / "bundled"))
    p.add_argument("--weights", type=Path)
    args = p.parse_args()
    repeats, scratch = 30 if args.quick else 200, tempfile.TemporaryDirectory()
    few = max(5, repeats // 10)
    predictor = Predictor.from_uri(args.model)
    if args.weights:
        net, meta = export.load_weights(args.weights)
    else:
        meta, norm = predictor.metadata, predictor.metadata["normalization"]
        net = create_model(meta["model"], width=meta["width"], mean=norm["mean"], std=norm["std"])
    torch.set_grad_enabled(False)
    model = export.ServedNet(net.eval(), *export.tta_of(meta)).eval()  # eager: the network part of the served graph
    # the float32 served graph (as a training run logs it) with the served model's head constants
    float_meta = {k: v for k, v in {**predictor.metadata, **meta}.items() if k not in ("precision", "quantization")}
    served, float_path = export.constants_of(onnx.load(str(predictor.onnx_path))), f"{scratch.name}/float32.onnx"
    onnx.save(export.export_served(net, float_meta, served), float_path)
    f32 = Predictor(Path(float_path)).predict_arrays
    runners = {"served": predictor.predict_arrays, "float32 ONNX": f32, "eager": lambda x: model(torch.from_numpy(x))}
    rng = np.random.default_rng(0)
    one, batch = rng.integers(0, 255, (1, 32, 32, 3), np.uint8), rng.integers(0, 255, (256, 32, 32, 3), np.uint8)
    figures = {"served precision": predictor.metadata.get("precision", "float32")}
    for name, run in runners.items():
        figures |= latency(name, lambda run=run: run(one), repeats)
        figures[f"{name} batch img/s"] = 256 / np.median(clock(lambda run=run: run(batch), few, warmup=1))
    y, x = np.mgrid[0:3000, 0:4000]  # a 12 MP photo-like image: smooth gradients (noise: an unrealistic JPEG)
    photo = np.stack([(x / 16) % 256, (y / 12) % 256, ((x + y) / 28) % 256], -1).astype(np.uint8)
    Image.fromarray(photo).save(jpeg := io.BytesIO(), format="JPEG", quality=90)
    figures |= latency("12 MP JPEG", lambda: predictor.predict_arrays([decode_image(jpeg.getvalue())]), 2 * few)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(1000):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(f"{tmp}/{i:04d}.png")
        # A registry URI runs twice on an empty model cache: the first call resolves it with MLflow,
        # the second reads the copy cifar.serve.modelcache kept (the store is unchanged in between).
        fresh_cache = {"CIFAR_MODEL_CACHE": f"{scratch.name}/model-cache"}
        figures["predict CLI img/s"] = predict_cli(tmp, args.model, fresh_cache)
        if args.model.startswith("models:/"):
            figures["predict CLI next call img/s"] = predict_cli(tmp, args.model, fresh_cache)
        figures["predict CLI float32 img/s"] = predict_cli(tmp, float_path, {})
    scratch.cleanup()
    label = re.sub(r"[^\w@=-]+", "-", args.model.rstrip("/").rsplit("/", 1)[-1])  # bundled, m-<id>, name@alias
    record(f"inference.{label}", figures, args)
