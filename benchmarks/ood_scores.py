"""Which "none of these" score to ship: candidates on one served model's own network, each fitted on 10,000
training images and thresholded on validation (96% accepted) as the shipped score is, chosen on outliers made
from validation (jigsaw, smooth noise, inverted); noise, flat colours and Fashion-MNIST reported only.

    python benchmarks/ood_scores.py --model models/bundled   # or models:/cifar10-classifier@production
"""

import numpy as np
import onnx
from harness import label, parser, record
from PIL import Image

from cifar.contract import schema
from cifar.contract.trust import ACCEPT_RATE
from cifar.data import ensure_cache
from cifar.run import export
from cifar.run.calibration import auroc, fit_density, fit_sample, fit_temperature, ood_sets
from cifar.serve.inference import Predictor


def selection_outliers(images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    rng, n = np.random.default_rng(seed), len(images)
    tiles = images.reshape(n, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, 16, 8, 8, 3)
    shuffled = np.stack([t[rng.permutation(16)] for t in tiles])
    jigsaw = shuffled.reshape(n, 4, 4, 8, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(images.shape)
    small = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    smooth = np.stack([np.asarray(Image.fromarray(s).resize((32, 32), Image.Resampling.BICUBIC)) for s in small])
    return {"jigsaw": jigsaw, "smooth_noise": smooth, "inverted": 255 - images}


def _logsumexp(z: np.ndarray) -> np.ndarray:
    top = z.max(1, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(1, keepdims=True)))[:, 0]


def mahalanobis(train_f, train_y, classes: int, normalise: bool, per_class: bool = True):
    """Nearest-class squared Mahalanobis distance (higher = more out of distribution)."""
    labels, classes = (train_y, classes) if per_class else (np.zeros_like(train_y), 1)
    if normalise:
        whitening, means = fit_density(train_f, labels, classes)
    else:  # the textbook score on raw features (Lee et al. 2018)
        means = np.stack([train_f[labels == c].mean(0) for c in range(classes)])
        centred = train_f - means[labels]
        eigenvalues, vectors = np.linalg.eigh(centred.T @ centred / len(centred))
        whitening = vectors / np.sqrt(np.maximum(eigenvalues, eigenvalues.max() * 1e-9))
        means = means @ whitening

    def score(f):
        z = (f / np.linalg.norm(f, axis=1, keepdims=True) if normalise else f) @ np.asarray(whitening, np.float64)
        return ((z[:, None, :] - means[None]) ** 2).sum(-1).min(1) / z.shape[1]

    return score


if __name__ == "__main__":
    p = parser(__doc__, "--data-dir")
    p.add_argument("--model", default="models/bundled")
    args = p.parse_args()
    predictor = Predictor.from_uri(args.model)
    proto = onnx.load(str(predictor.onnx_path))
    pen = schema.metadata_of(proto).get("features", {}).get("penultimate")
    net, data = export.network_of(proto), ensure_cache(args.data_dir)
    classes, (train_images, train_y) = len(data.classes), fit_sample(data)
    (_, train_f), val, test = (net(x) for x in (train_images, *(np.asarray(data.images[s]) for s in ("val", "test"))))
    temperature = fit_temperature(val[0], data.labels["val"])
    selection = {k: net(v) for k, v in selection_outliers(np.asarray(data.images["val"][:1000])).items()}
    held_out = {s.name: net(s.images) for s in ood_sets()[0]}
    shipped = export.constants_of(proto)
    all_fit = fit_density(net(np.asarray(data.images["train"]))[1], data.labels["train"], classes)

    def head(constants):
        return lambda lf: export.apply_head(data.classes, constants, *lf)[schema.OOD_SCORE]

    def energy(lf):
        return -temperature * _logsumexp(lf[0] / temperature)

    log_norm = np.log(np.linalg.norm(train_f, axis=1)).mean()
    candidates = {  # name: score of (logits, features), higher = more out of distribution
        "energy (the score before)": energy,
        "max softmax": lambda lf: -np.exp(lf[0] / temperature - _logsumexp(lf[0] / temperature)[:, None]).max(1),
        "feature norm": lambda lf: np.abs(np.log(np.linalg.norm(lf[1], axis=1)) - log_norm),
    }
    last, every = slice(-(pen or 1), None), slice(None)
    for name, cols, normalise, per_class in [
        *(
            [
                ("Mahalanobis penultimate raw (Lee et al.)", last, False, True),
                ("Mahalanobis penultimate normalised", last, True, True),
            ]
            if pen
            else []
        ),
        ("Mahalanobis all stages raw", every, False, True),
        ("one Gaussian all stages normalised", every, True, False),
    ]:
        fitted = mahalanobis(train_f[:, cols], train_y, classes, normalise, per_class)
        candidates[name] = lambda lf, fitted=fitted, cols=cols: fitted(lf[1][:, cols])
    candidates["SHIPPED Mahalanobis all stages normalised"] = head(shipped)
    val_s, val_e = head(shipped)(val), energy(val)  # the sum below standardises each on validation
    candidates["shipped + energy standardised"] = lambda lf: (
        (head(shipped)(lf) - val_s.mean()) / val_s.std() + (energy(lf) - val_e.mean()) / val_e.std()
    )
    candidates["shipped fitted on 45,000"] = head(export.Constants(shipped.temperature, shipped.threshold, *all_fit))
    meta = predictor.metadata
    figures = {
        "model": f"{meta.get('model')} {meta.get('width')} {meta.get('precision', 'float32')}",
        "training images": len(train_y),
    }
    for name, score in candidates.items():
        threshold, test_scores = np.quantile(score(val), ACCEPT_RATE), score(test)
        chosen = {k: auroc(test_scores, score(v)) for k, v in selection.items()}
        reported = {k: (auroc(test_scores, score(v)), np.mean(score(v) <= threshold)) for k, v in held_out.items()}
        figures[f"{name}: selection AUROC"] = float(np.mean(list(chosen.values())))
        if name.startswith("SHIPPED"):
            figures |= {f"shipped: {k} AUROC": a for k, (a, _) in reported.items()}
        held = ", ".join(f"{k} AUROC {a:.3f}, accepted {f:.1%}" for k, (a, f) in reported.items())
        print(
            f"{name}: selection "
            + ", ".join(f"{k} AUROC {v:.3f}" for k, v in chosen.items())
            + f"; test accepted {np.mean(test_scores <= threshold):.1%}; held out: {held}",
            flush=True,
        )
    figures["best"] = max(candidates, key=lambda name: figures[f"{name}: selection AUROC"])
    record(f"ood_scores.{label(args.model)}", figures, seeds=[0], write=not args.no_results)
