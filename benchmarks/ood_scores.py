"""Which "none of these" score to ship: candidates side by side on one served model's own network.

    python benchmarks/ood_scores.py --model models/bundled
    python benchmarks/ood_scores.py --model models:/cifar10-classifier@production

Every candidate is fitted on training images (10,000) and thresholded on the validation split
(96% accepted), exactly as the shipped score is. The choice is made on *selection* outliers that
are built from the validation split and are not among the reported sets: jigsaw-shuffled images
(8x8 tiles), smooth colour noise (4x4 upsampled) and colour-inverted images. Uniform noise, flat
colours and Fashion-MNIST are reported only (AUROC, and the share accepted at the threshold).
The shipped score runs through the graph's own head (``cifar.serve.contract.apply_head``); the others
are NumPy readings of the same network outputs. Also: the shipped score fitted on all 45,000
training images instead of 10,000.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine_name, record  # noqa: E402

from cifar.assess.calibration import fit_sample, ood_sets  # noqa: E402
from cifar.assess.trust import ACCEPT_RATE, auroc, fit_density, fit_temperature  # noqa: E402
from cifar.data import ensure_cache  # noqa: E402
from cifar.serve import contract  # noqa: E402
from cifar.serve.inference import Predictor  # noqa: E402


def selection_outliers(images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    tiles = images.reshape(len(images), 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(len(images), 16, 8, 8, 3)
    shuffled = np.stack([t[rng.permutation(16)] for t in tiles])
    jigsaw = shuffled.reshape(len(images), 4, 4, 8, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(images.shape)
    small = rng.integers(0, 256, (len(images), 4, 4, 3), dtype=np.uint8)
    smooth = np.stack([np.asarray(Image.fromarray(s).resize((32, 32), Image.Resampling.BICUBIC)) for s in small])
    return {"jigsaw": jigsaw, "smooth_noise": smooth, "inverted": 255 - images}


def _logsumexp(z: np.ndarray) -> np.ndarray:
    top = z.max(1, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(1, keepdims=True)))[:, 0]


def mahalanobis(train_f, train_y, classes: int, normalise: bool, per_class: bool = True):
    """Nearest-class squared Mahalanobis distance (higher = more out of distribution)."""

    def prep(f):
        return f / np.linalg.norm(f, axis=1, keepdims=True) if normalise else f

    labels = train_y if per_class else np.zeros_like(train_y)
    if normalise:
        whitening, means = fit_density(train_f, labels, classes if per_class else 1)
    else:  # the textbook score on raw features (Lee et al. 2018)
        means = np.stack([train_f[labels == c].mean(0) for c in range(classes if per_class else 1)])
        centred = train_f - means[labels]
        eigenvalues, vectors = np.linalg.eigh(centred.T @ centred / len(centred))
        whitening = vectors / np.sqrt(np.maximum(eigenvalues, eigenvalues.max() * 1e-9))
        means = means @ whitening

    def score(f):
        z = prep(f) @ np.asarray(whitening, np.float64)
        return ((z[:, None, :] - means[None]) ** 2).sum(-1).min(1) / z.shape[1]

    return score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/bundled")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args()

    import onnx

    predictor = Predictor.from_uri(args.model)
    proto = onnx.load(str(predictor.onnx_path))
    penultimate = contract.metadata_of(proto).get("features", {}).get("penultimate")
    net = contract.network_of(proto)
    data = ensure_cache(args.data_dir)
    classes = len(data.classes)
    train_images, train_y = fit_sample(data)
    (_, train_f), (val_l, val_f), (test_l, test_f) = (
        net(x) for x in (train_images, np.asarray(data.images["val"]), np.asarray(data.images["test"]))
    )
    temperature = fit_temperature(val_l, data.labels["val"])
    selection = {k: net(v) for k, v in selection_outliers(np.asarray(data.images["val"][:1000])).items()}
    held_out = {s.name: net(s.images) for s in ood_sets()[0]}
    shipped = contract.constants_of(proto)
    _, all_train_f = net(np.asarray(data.images["train"]))
    all_whitening, all_means = fit_density(all_train_f, data.labels["train"], classes)

    def through_head(constants):
        return lambda lf: contract.apply_head(data.classes, constants, *lf)[contract.OOD_SCORE]

    candidates = {
        "energy -T logsumexp(logits/T) (the score before)": lambda lf: -temperature * _logsumexp(lf[0] / temperature),
        "max softmax probability": lambda lf: (
            -np.exp(lf[0] / temperature - _logsumexp(lf[0] / temperature)[:, None]).max(1)
        ),
        "feature norm (distance from the training mean, log)": (
            lambda m: lambda lf: np.abs(np.log(np.linalg.norm(lf[1], axis=1)) - m)
        )(np.log(np.linalg.norm(train_f, axis=1)).mean()),
    }
    if penultimate:
        pen = mahalanobis(train_f[:, -penultimate:], train_y, classes, normalise=False)
        candidates["Mahalanobis, penultimate, raw (Lee et al.)"] = lambda lf: pen(lf[1][:, -penultimate:])
        pen_n = mahalanobis(train_f[:, -penultimate:], train_y, classes, normalise=True)
        candidates["Mahalanobis, penultimate, normalised"] = lambda lf: pen_n(lf[1][:, -penultimate:])
    raw_all = mahalanobis(train_f, train_y, classes, normalise=False)
    candidates["Mahalanobis, all stages, raw"] = lambda lf: raw_all(lf[1])
    classless = mahalanobis(train_f, train_y, classes, normalise=True, per_class=False)
    candidates["one Gaussian, all stages, normalised"] = lambda lf: classless(lf[1])
    candidates["SHIPPED: Mahalanobis, all stages, normalised (graph head)"] = through_head(shipped)
    val_shipped, val_energy = through_head(shipped)((val_l, val_f)), -temperature * _logsumexp(val_l / temperature)

    def combined(lf):  # energy and the shipped score, each standardised on validation
        a, b = through_head(shipped)(lf), -temperature * _logsumexp(lf[0] / temperature)
        return (a - val_shipped.mean()) / val_shipped.std() + (b - val_energy.mean()) / val_energy.std()

    candidates["shipped + energy, standardised sum"] = combined
    candidates["shipped, fitted on all 45,000 training images"] = through_head(
        contract.Constants(shipped.temperature, shipped.threshold, all_whitening, all_means)
    )

    rows, means = [], {}
    for name, score in candidates.items():
        threshold = np.quantile(score((val_l, val_f)), ACCEPT_RATE)
        test_scores = score((test_l, test_f))
        chosen = {k: auroc(test_scores, score(v)) for k, v in selection.items()}
        reported = {
            k: (auroc(test_scores, score(v)), float(np.mean(score(v) <= threshold))) for k, v in held_out.items()
        }
        means[name] = float(np.mean(list(chosen.values())))
        rows.append(
            f"{name}: selection mean AUROC {means[name]:.3f} ("
            + ", ".join(f"{k} {v:.3f}" for k, v in chosen.items())
            + f"); test accepted {np.mean(test_scores <= threshold):.1%}; held out: "
            + ", ".join(f"{k} AUROC {a:.3f}, accepted {fa:.1%}" for k, (a, fa) in reported.items())
        )
        print(rows[-1], flush=True)
    rows.insert(
        0,
        f"setting: `{args.model}` ({predictor.metadata.get('model')} width {predictor.metadata.get('width')}, "
        f"{predictor.metadata.get('precision', 'float32')}), {len(train_y):,} training images, {machine_name()}; "
        f"command: `python benchmarks/ood_scores.py --model {args.model}`",
    )
    best = max(means, key=means.get)
    rows.append(f"best on the selection outliers: {best} (mean AUROC {means[best]:.3f})")
    record("ood_scores", rows, write=not args.no_results)


if __name__ == "__main__":
    main()
