"""Bad input, numerical faults and damaged files: one clear message, a non-zero exit, nothing half-written."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import smoke_dict
from ray_s2p.config import ConfigError, RunConfig, load_config
from ray_s2p.distributed.checkpoint import CheckpointError, list_checkpoints
from ray_s2p.distributed.driver import TrainingError, train
from ray_s2p.distributed.replay import replay_run
from ray_s2p.zo.ledger import LedgerError

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "ray_s2p"]


@pytest.mark.parametrize("data,field", [
    ({"stepz": 3}, "stepz"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr"),
    ({"optimizer": {"lr": -1.0}}, "optimizer.lr"),
    ({"optimizer": {"rho": 0}}, "optimizer.rho"),
    ({"steps": 0}, "steps"),
    ({"cluster": {"replicas": 0}}, "cluster.replicas"),
    ({"optimizer": {"name": "adam_zo"}}, "optimizer.name"),
    ({"cluster": {"mode": "ring"}}, "cluster.mode"),
    ({"cluster": {"noise_threads": -1}}, "cluster.noise_threads"),
    ({"task": {"trainable": "everything"}}, "task.trainable"),
    ({"progress": "maybe"}, "progress"),
])
def test_config_errors_name_the_field_and_the_fix(data, field):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(data)
    message = str(info.value)
    assert f"'{field}'" in message and "Fix:" in message


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def cli_train(tmp_path: Path, *sets: str, output: str = "run") -> subprocess.CompletedProcess:
    cfg = tmp_path / "smoke.yaml"
    cfg.write_text(yaml.safe_dump(smoke_dict()))
    args = CLI + ["train", "--config", str(cfg), "--output", str(tmp_path / output)]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override,needle", [
    ("task.name=vision_transformer_xl", "task.name"),
    ("optimizer.name=adam_zo", "optimizer.name"),
    ("cluster.replicas=-2", "cluster.replicas"),
    ("task.bogus=1", "task.bogus"),
])
def test_cli_rejects_bad_input_cleanly(tmp_path, override, needle):
    done = cli_train(tmp_path, override)
    assert done.returncode == 2
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists(), "nothing may be written for a rejected config"


def test_missing_dataset_file_leaves_nothing(tmp_path):
    done = cli_train(tmp_path, "task.name=text_classification", "task.model=tiny-bert",
                     f"task.dataset={tmp_path / 'missing.csv'}")
    assert done.returncode == 2
    assert "missing.csv" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_nan_loss_is_skipped_and_recorded(tmp_path):
    cfg = RunConfig.from_dict(smoke_dict(**{"task.name": "fault_tasks:build",
                                            "task.options": {"marker_dir": str(tmp_path), "at_step": 5,
                                                             "kind": "nan_once"}}))
    result = train(cfg, tmp_path / "run", log=lambda m: None)
    rows = pq.read_table(tmp_path / "run" / "ledger.parquet").to_pylist()
    step5 = [r for r in rows if r["step"] == 5]
    assert all(r["skipped"] and r["coefficient"] == 0.0 for r in step5)
    assert not any(r["skipped"] for r in rows if r["step"] != 5)
    assert result.summary["skipped_directions"] == 2
    assert replay_run(tmp_path / "run").digest == result.final_digest


def test_too_many_nan_losses_stop_the_run(tmp_path):
    cfg = RunConfig.from_dict(smoke_dict(**{"task.name": "fault_tasks:build", "optimizer.max_bad_losses": 4,
                                            "task.options": {"marker_dir": str(tmp_path), "at_step": 6,
                                                             "kind": "nan_forever"}}))
    with pytest.raises(TrainingError, match="4 steps in a row had only non-finite losses"):
        train(cfg, tmp_path / "run", log=lambda m: None)


def trained(tmp_path: Path, name: str = "run", **overrides) -> Path:
    train(RunConfig.from_dict(smoke_dict(**overrides)), tmp_path / name, log=lambda m: None)
    return tmp_path / name


def test_truncated_ledger_is_reported(tmp_path):
    run_dir = trained(tmp_path)
    data = (run_dir / "ledger.parquet").read_bytes()
    (run_dir / "ledger.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(LedgerError, match="truncated or corrupted"):
        replay_run(run_dir)
    done = subprocess.run(CLI + ["replay", str(run_dir), "--check"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "truncated or corrupted" in done.stderr


def test_corrupted_checkpoint_fails_its_checksum_and_resume_falls_back(tmp_path):
    run_dir = trained(tmp_path, **{"steps": 30, "checkpoint_every": 10})
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    blob = bytearray((newest / "params.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (newest / "params.safetensors").write_bytes(bytes(blob))
    from ray_s2p.distributed.checkpoint import load_checkpoint
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_checkpoint(newest)
    # Resume skips the damaged checkpoint, takes the older one, and redoes the lost steps exactly.
    cfg = RunConfig.from_dict(smoke_dict(**{"steps": 30, "checkpoint_every": 10}))
    reference = train(cfg, tmp_path / "reference", log=lambda m: None)
    resumed = train(cfg, run_dir, resume=True, log=lambda m: None)
    assert resumed.final_digest == reference.final_digest


def test_checkpoint_of_another_config_is_refused(tmp_path):
    run_dir = trained(tmp_path)
    other = RunConfig.from_dict(smoke_dict(**{"optimizer.eta": 0.5}))
    with pytest.raises(CheckpointError, match="belongs to another config"):
        train(other, run_dir, resume=True, log=lambda m: None)


def test_swapped_ledger_is_refused_on_resume(tmp_path):
    a = trained(tmp_path, "a", steps=20)
    b = trained(tmp_path, "b", steps=20, seed=9)
    shutil.copy2(b / "ledger.parquet", a / "ledger.parquet")
    with pytest.raises(TrainingError, match="does not match the checkpoint"):
        train(RunConfig.from_dict(smoke_dict(steps=30)), a, resume=True, log=lambda m: None)


def test_resume_of_a_directory_without_a_run(tmp_path):
    with pytest.raises(ValueError, match="holds no run"):
        train(RunConfig.from_dict(smoke_dict()), tmp_path / "empty", resume=True, log=lambda m: None)


def test_no_unsafe_deserialisation_in_the_package():
    sources = {p: p.read_text() for p in (ROOT / "ray_s2p").rglob("*.py")}
    for path, text in sources.items():
        assert not re.search(r"^\s*import pickle|^\s*from pickle|cloudpickle\.load|pickle\.load", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "trust_remote_code=True" not in text, path


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    from ray_s2p.files import atomic_path, write_text
    target = tmp_path / "summary.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    import hashlib
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_refused_resume_leaves_the_run_directory_byte_identical(tmp_path):
    assert cli_train(tmp_path, "steps=20").returncode == 0
    run_dir = tmp_path / "run"
    before = tree_hashes(run_dir)
    refused = subprocess.run(CLI + ["train", "--resume", str(run_dir), "--set", "optimizer.eta=0.5"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "belongs to another config" in refused.stderr, refused.stderr
    assert tree_hashes(run_dir) == before
    # The refusal did not poison config.yaml: a plain resume still runs, here on to step 30.
    done = subprocess.run(CLI + ["train", "--resume", str(run_dir), "--set", "steps=30"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["steps"] == 30  # an accepted override is kept
