"""ray-s2p plot: a real PNG with visible curves from fake run directories; clear errors otherwise."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ray_s2p.cli.plot import register as add_plot_command
from ray_s2p.distributed.run_dir import METRIC_COLUMNS
from ray_s2p.errors import RayS2PError
from ray_s2p.plots.curves import default_label, load_curves, moving_average, plot_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SCHEMA = pa.schema([
    ("step", pa.int64()), ("kind", pa.string()), ("loss", pa.float64()), ("eval_loss", pa.float64()),
    ("eval_accuracy", pa.float64()), ("eval_macro_f1", pa.float64()), ("forward_passes", pa.int64()),
    ("wall_seconds", pa.float64()), ("bytes_sent", pa.int64()), ("bytes_received", pa.int64()),
    ("skipped_directions", pa.int64())])


def make_run(root: Path, name: str, optimizer: str, *, passes_per_step: int, decay: float,
             with_accuracy: bool = True) -> Path:
    """A run directory shaped like RunDirectory's: config.yaml + metrics.parquet."""
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"optimizer": {"name": optimizer}}))
    rows = []
    empty = {c: None for c in METRIC_COLUMNS}
    for step in range(1, 61):
        # A decaying loss with a deterministic wiggle, so smoothing has something to do.
        loss = 0.7 * math.exp(-decay * step) + 0.05 * math.sin(step) + 0.1
        rows.append({**empty, "step": step, "kind": "train", "loss": loss, "forward_passes": step * passes_per_step,
                     "wall_seconds": 0.1 * step, "bytes_sent": 64, "bytes_received": 64, "skipped_directions": 0})
    for step in (0, 20, 40, 60):
        acc = 0.5 + 0.4 * (1 - math.exp(-decay * step)) if with_accuracy else None
        rows.append({**empty, "step": step, "kind": "eval", "eval_loss": 0.7 * math.exp(-decay * step) + 0.1,
                     "eval_accuracy": acc, "eval_macro_f1": acc, "forward_passes": step * passes_per_step,
                     "wall_seconds": 0.1 * step})
    rows.append({**empty, "step": 61, "kind": "train", "loss": float("nan"), "forward_passes": 61 * passes_per_step})
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), run / "metrics.parquet")
    return run


@pytest.fixture()
def two_runs(tmp_path: Path) -> list[Path]:
    return [make_run(tmp_path, "run-a", "vs2p", passes_per_step=2, decay=0.05),
            make_run(tmp_path, "run-b", "mezo", passes_per_step=2, decay=0.02)]


def _assert_real_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000, f"suspiciously small PNG: {len(data)} bytes"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 500 and pixels.shape[1] > 500
    # A blank or single-colour canvas has std ~0; axes, text and curves push it well up.
    assert float(np.std(pixels[..., :3])) > 0.05
    # Curves are drawn in colour (C0 blue, C1 orange), not only black-on-white axes.
    rgb = pixels[..., :3]
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    assert (saturation > 0.3).sum() > 500


def test_plot_two_runs_writes_png(two_runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "plots" / "curves.png"
    assert plot_runs(two_runs, out) == out
    _assert_real_png(out)
    # Atomic write: no temporary file left next to the result.
    assert sorted(p.name for p in out.parent.iterdir()) == ["curves.png"]


def test_plot_replaces_existing_file_and_accepts_labels(two_runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    out.write_bytes(b"old")
    plot_runs(two_runs, out, labels=["first", "second"])
    _assert_real_png(out)


def test_eval_loss_used_when_a_run_has_no_accuracy(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, "a", "vs2p", passes_per_step=2, decay=0.05),
            make_run(tmp_path, "b", "sgd", passes_per_step=1, decay=0.05, with_accuracy=False)]
    out = plot_runs(runs, tmp_path / "loss.png")
    _assert_real_png(out)


def test_load_curves_drops_nonfinite_loss_and_labels(two_runs: list[Path]) -> None:
    curves = load_curves(two_runs[0])
    assert curves.label == "vs2p (run-a)"
    assert curves.train_step == list(range(1, 61))  # step 61 (NaN loss) dropped
    assert curves.eval_step == [0, 20, 40, 60]
    assert curves.eval_passes == [0, 40, 80, 120]


def test_default_label_falls_back_to_dir_name(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    assert default_label(bare) == "bare"


def test_moving_average_values() -> None:
    assert moving_average([1.0, 2.0, 3.0, 4.0], window=2) == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([4.0, 2.0], window=5) == [4.0, 3.0]
    assert moving_average([1.0, 3.0], window=1) == [1.0, 3.0]
    with pytest.raises(RayS2PError):
        moving_average([1.0], window=0)


def test_missing_metrics_names_the_directory(two_runs: list[Path], tmp_path: Path) -> None:
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    out = tmp_path / "x.png"
    with pytest.raises(RayS2PError, match="not-a-run.*metrics.parquet"):
        plot_runs([two_runs[0], empty], out)
    assert not out.exists()


def test_unreadable_metrics_names_the_directory(tmp_path: Path) -> None:
    run = tmp_path / "torn-run"
    run.mkdir()
    (run / "metrics.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(RayS2PError, match="torn-run.*unreadable"):
        plot_runs([run], tmp_path / "x.png")


def test_label_count_mismatch(two_runs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(RayS2PError, match="2 run directories"):
        plot_runs(two_runs, tmp_path / "x.png", labels=["only-one"])


def test_plot_subcommand(two_runs: list[Path], tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="ray-s2p")
    add_plot_command(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli.png"
    args = parser.parse_args(["plot", str(two_runs[0]), str(two_runs[1]), "-o", str(out), "--labels", "a,b"])
    assert args.func(args) == 0
    _assert_real_png(out)


def test_plot_reads_run_directories_at_a_uri(two_runs: list[Path], tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="ray-s2p")
    add_plot_command(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "uri.png"
    args = parser.parse_args(["plot", f"file://{two_runs[0]}", f"file://{two_runs[1]}", "-o", str(out)])
    assert args.func(args) == 0
    _assert_real_png(out)
    assert load_curves(f"file://{two_runs[0]}").label == "vs2p (run-a)"
