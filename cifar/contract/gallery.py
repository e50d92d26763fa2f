"""The sample images a model's run carries, artifact folder ``samples/``: the app's gallery.

    samples/
      samples.json    [{"file": "cat_0.png", "label": "cat"}, ...]: each image's true class
      cat_0.png ...   test images as the dataset holds them, a few per class

A training run and the bundled model write it; the app reads it. Torch-free, so the slim app imports it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLES_FOLDER, INDEX = "samples", "samples.json"


def write_samples(images: np.ndarray, labels: np.ndarray, classes: list[str], folder: Path, limit: int = 20) -> Path:
    """The first test images of each class (two each up to 10 classes, then one each), at most ``limit``."""
    per_class = 2 if 2 * len(classes) <= limit else 1
    stems = [re.sub(r"[^\w-]+", "-", name, flags=re.ASCII).strip("-") or "class" for name in classes]
    if len(set(stems)) < len(stems):  # names that differ only in punctuation or accents keep apart
        stems = [f"{i}-{stem}" for i, stem in enumerate(stems)]
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for c, name in enumerate(classes[: limit // per_class]):
        for k, i in enumerate(np.flatnonzero(np.asarray(labels) == c)[:per_class]):
            file = f"{stems[c]}_{k}.png"
            Image.fromarray(np.asarray(images[i])).save(folder / file)
            index.append({"file": file, "label": name})
    (folder / INDEX).write_text(json.dumps(index, indent=1, ensure_ascii=False))
    return folder


def read_samples(folder: Path) -> list[tuple[str, Path]]:
    """(true class, image path) for each sample; none when the folder has no index."""
    if not (Path(folder) / INDEX).is_file():
        return []
    return [(s["label"], Path(folder) / s["file"]) for s in json.loads((Path(folder) / INDEX).read_text())]
