"""Exploratory data analysis of the prepared cache, logged as an MLflow run (experiment ``eda``).

    python -m cifar eda [--data-dir DIR]          (MLproject entry point: eda)

Class balance, the per-channel statistics training normalizes with, per-class colour
histograms, a per-image statistics table with box plots, sample and augmentation grids,
and exact / near-duplicate images between train and test; all in a self-contained HTML report.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cifar.cli import run_cli
from cifar.data import ensure_cache
from cifar.data.cache import SPLITS, CifarData, channel_stats
from cifar.tracking import check_tracking_store
from cifar.tracking.store import _mlflow


def class_balance(data: CifarData) -> pd.DataFrame:
    rows = [
        {"split": s, "class": c, "images": int((data.labels[s] == i).sum())}
        for s in SPLITS
        for i, c in enumerate(data.classes)
    ]
    return pd.DataFrame(rows)


def image_statistics(data: CifarData) -> pd.DataFrame:
    """Brightness, contrast and colourfulness (Hasler & Suesstrunk) of every image."""
    frames = []
    for split in SPLITS:
        x = np.asarray(data.images[split], dtype=np.float32)
        grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
        rg, yb = x[..., 0] - x[..., 1], 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
        colourfulness = np.sqrt(rg.std((1, 2)) ** 2 + yb.std((1, 2)) ** 2) + 0.3 * np.sqrt(
            rg.mean((1, 2)) ** 2 + yb.mean((1, 2)) ** 2
        )
        frames.append(
            pd.DataFrame(
                {
                    "split": split,
                    "index": np.arange(len(x)),
                    "label": [data.classes[i] for i in data.labels[split]],
                    "brightness": grey.mean((1, 2)),
                    "contrast": grey.std((1, 2)),
                    "colourfulness": colourfulness,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _downsampled(images: np.ndarray) -> np.ndarray:
    """8x8x3 block means (4x4 pixel blocks): a 192-number thumbnail that ignores JPEG noise."""
    x = np.asarray(images, np.float32)
    return x.reshape(len(x), 8, 4, 8, 4, 3).mean((2, 4)).reshape(len(x), 192)


@dataclass
class Duplicates:
    exact: pd.DataFrame  # test_index, train_split, train_index, mean_abs_diff
    near: pd.DataFrame


NEAR_MAX_THUMB_RMS = 6.0  # grey levels between 8x8 thumbnails: a candidate
NEAR_MAX_MEAN_DIFF = 12.0  # grey levels over the full image: confirmed (the JPEG copy itself is ~6 off)


def find_duplicates(data: CifarData, max_mean_diff: float = NEAR_MAX_MEAN_DIFF, chunk: int = 1000) -> Duplicates:
    """Test images that also appear in train/val: identical pixels, or near (nearest neighbour of
    the 8x8 thumbnail within ``NEAR_MAX_THUMB_RMS``, then a full-image mean difference within
    ``max_mean_diff``)."""
    test = np.asarray(data.images["test"])
    names = [(split, i) for split in ("train", "val") for i in range(len(data.labels[split]))]
    pool = np.concatenate([np.asarray(data.images["train"]), np.asarray(data.images["val"])])
    pool_thumbs, test_thumbs = _downsampled(pool), _downsampled(test)
    pool_norms = (pool_thumbs**2).sum(1)
    rows: dict[str, list] = {"exact": [], "near": []}
    for start in range(0, len(test), chunk):
        t = test_thumbs[start : start + chunk]
        distances = (t**2).sum(1)[:, None] + pool_norms[None, :] - 2 * t @ pool_thumbs.T
        nearest = distances.argmin(1)
        rms = np.sqrt(np.maximum(distances[np.arange(len(t)), nearest], 0) / 192)
        for offset in np.flatnonzero(rms <= NEAR_MAX_THUMB_RMS):
            j, k = start + offset, nearest[offset]
            diff = float(np.abs(pool[k].astype(np.int16) - test[j]).mean())
            if diff == 0:
                rows["exact"].append((j, *names[k], diff))
            elif diff <= max_mean_diff:
                rows["near"].append((j, *names[k], diff))
    columns = ["test_index", "train_split", "train_index", "mean_abs_diff"]
    return Duplicates(pd.DataFrame(rows["exact"], columns=columns), pd.DataFrame(rows["near"], columns=columns))


def figures(data: CifarData, balance: pd.DataFrame, stats: pd.DataFrame, duplicates: Duplicates, seed: int = 0) -> dict:
    import seaborn as sns  # lazy: start-up; seaborn takes ~1.5 s, and `eda --help` skips it
    import torch  # lazy: start-up; torch takes ~2 s, and `eda --help` skips it
    from matplotlib.figure import Figure  # lazy: start-up, as seaborn

    from cifar.data.loader import Augmentation, augment_batch, images_to_tensor  # lazy: start-up, it imports torch

    out = {}
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    sns.barplot(data=balance, x="class", y="images", hue="split", ax=fig.subplots())
    fig.axes[0].set(title="Images per class and split", xlabel="")
    fig.axes[0].legend(title="split", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    out["class_balance.png"] = fig

    fig = Figure(figsize=(16, 6), layout="constrained")
    axes = fig.subplots(2, 5, sharex=True, sharey=True).ravel()
    train = np.asarray(data.images["train"])
    for i, (ax, name) in enumerate(zip(axes, data.classes)):
        pixels = train[data.labels["train"] == i].reshape(-1, 3)
        for channel, colour in enumerate(("red", "green", "blue")):
            ax.hist(pixels[:, channel], bins=64, range=(0, 255), histtype="step", color=colour, density=True)
        ax.set_title(name)
    fig.suptitle("Per-class colour histograms (training split)")
    out["colour_histograms.png"] = fig

    fig = Figure(figsize=(16, 4.5), layout="constrained")
    for ax, column in zip(fig.subplots(1, 3), ("brightness", "contrast", "colourfulness")):
        sns.boxplot(data=stats, x=column, y="label", order=list(data.classes), ax=ax, fliersize=1)
        ax.set(title=column, ylabel="")
    out["image_statistics.png"] = fig

    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(data.labels["train"] == i), 10, replace=False) for i in range(len(data.classes))]
    fig = Figure(figsize=(12, 12.5), layout="constrained")
    axes = fig.subplots(len(data.classes), 10)
    for row, (indices, name) in enumerate(zip(picks, data.classes)):
        for col, index in enumerate(indices):
            axes[row, col].imshow(train[index], interpolation="nearest")
            axes[row, col].axis("off")
        axes[row, 0].set_title(name, loc="left", fontsize=9)
    fig.suptitle("Sample training images per class")
    out["samples.png"] = fig

    chosen = np.array([p[0] for p in picks])
    original = images_to_tensor(train[chosen], "cpu").float() / 255
    generator = torch.Generator().manual_seed(seed)
    rows = [original] + [augment_batch(original, Augmentation(True, 2, 8), generator) for _ in range(4)]
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    axes = fig.subplots(len(rows), len(chosen))
    for r, batch in enumerate(rows):
        for c in range(len(chosen)):
            axes[r, c].imshow(batch[c].permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[r, c].axis("off")
    axes[0, 0].set_title("original", loc="left", fontsize=9)
    axes[1, 0].set_title("augmented (flip, translate 2, cutout 8)", loc="left", fontsize=9)
    fig.suptitle("Training augmentation applied to the same images")
    out["augmentation.png"] = fig

    pairs = pd.concat([duplicates.exact.assign(kind="exact"), duplicates.near.assign(kind="near")]).head(8)
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    axes = np.atleast_2d(fig.subplots(2, max(1, len(pairs)), squeeze=False))
    for ax in axes.ravel():
        ax.axis("off")
    for c, row in enumerate(pairs.itertuples()):
        axes[0, c].imshow(np.asarray(data.images["test"])[row.test_index], interpolation="nearest")
        axes[0, c].set_title(f"test {row.test_index} ({row.kind})", fontsize=8)
        axes[1, c].imshow(np.asarray(data.images[row.train_split])[row.train_index], interpolation="nearest")
        axes[1, c].set_title(f"{row.train_split} {row.train_index}", fontsize=8)
    fig.suptitle(f"Train/test duplicates: {len(duplicates.exact)} exact, {len(duplicates.near)} near (examples)")
    out["duplicates.png"] = fig
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def html_report(
    data: CifarData, balance: pd.DataFrame, stats: pd.DataFrame, duplicates: Duplicates, images: dict[str, bytes]
) -> str:
    mean, std = channel_stats(np.asarray(data.images["train"]))
    summary = stats.groupby("label")[["brightness", "contrast", "colourfulness"]].mean().round(1)
    parts = [
        "<html><head><meta charset='utf-8'><title>CIFAR-10 EDA</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px}img{max-width:100%}</style></head><body>",
        f"<h1>CIFAR-10: exploratory analysis</h1><p>Source <code>{data.manifest['source']}</code>, cache digest "
        f"<code>{data.digest[:12]}</code>; {', '.join(f'{s} {n:,}' for s, n in data.sizes().items())} images.</p>",
        "<h2>Class balance</h2>",
        balance.pivot(index="class", columns="split", values="images").to_html(),
        "<h2>Per-channel statistics (training split, [0, 1] units)</h2>"
        f"<p>mean (R, G, B) = {mean}; std = {std}. Training normalizes with exactly these "
        "(the cache manifest's <code>mean</code>/<code>std</code>).</p>",
        "<h2>Per-image statistics by class (means)</h2>",
        summary.to_html(),
        f"<h2>Duplicates between train/val and test</h2><p>{len(duplicates.exact)} exact and "
        f"{len(duplicates.near)} near duplicates (same 64-bit average hash).</p>",
    ]
    for name, png in images.items():
        parts.append(f"<h3>{name}</h3><img src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def run_eda(data_dir: Path | None = None, experiment: str = "eda", dataset: str = "") -> str:
    """Compute everything and log it as one MLflow run; returns the run id."""
    mlflow = _mlflow()
    check_tracking_store()
    data = ensure_cache(data_dir, dataset=dataset)
    balance, stats, duplicates = class_balance(data), image_statistics(data), find_duplicates(data)
    figs = figures(data, balance, stats, duplicates)
    pngs = {name: _png(fig) for name, fig in figs.items()}
    mean, std = channel_stats(np.asarray(data.images["train"]))
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"eda-{data.digest[:8]}") as run:
        mlflow.set_tags({"data_digest": data.digest, "data_source": data.manifest["source"]})
        mlflow.log_params(
            {
                "data.train_size": len(data.labels["train"]),
                "data.val_size": len(data.labels["val"]),
                "data.test_size": len(data.labels["test"]),
            }
        )
        mlflow.log_metrics(
            {
                **{f"mean_{c}": m for c, m in zip("rgb", mean)},
                **{f"std_{c}": s for c, s in zip("rgb", std)},
                "duplicates_exact": len(duplicates.exact),
                "duplicates_near": len(duplicates.near),
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            for name, png in pngs.items():
                (folder / name).write_bytes(png)
            balance.to_csv(folder / "class_balance.csv", index=False)
            stats.to_csv(folder / "image_statistics.csv.gz", index=False, float_format="%.3f")
            duplicates.exact.to_csv(folder / "duplicates_exact.csv", index=False)
            duplicates.near.to_csv(folder / "duplicates_near.csv", index=False)
            (folder / "report.html").write_text(html_report(data, balance, stats, duplicates, pngs))
            mlflow.log_artifacts(tmp, "eda")
    print(
        f"EDA of {data.digest[:12]}: {len(duplicates.exact)} exact / {len(duplicates.near)} near train-test "
        f"duplicates; report in run {run.info.run_id} (eda/report.html)"
    )
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cifar eda", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default="", help="prepared data (default $CIFAR_DATA or ./data)")
    parser.add_argument("--experiment", default="eda")
    parser.add_argument("--dataset", default="", help="a prepared dataset other than CIFAR-10 (its data and model)")
    args = parser.parse_args(argv)
    run_eda(Path(args.data_dir) if args.data_dir else None, args.experiment, args.dataset)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
