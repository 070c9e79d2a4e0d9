"""What a config written by an earlier version means today, and fingerprints that stay stable.

Keys added after runs and results exist get a value that reproduces what those runs computed.
``saved_config`` loads a run directory's config.yaml with that value; ``trajectory_dict`` leaves such
keys out of result fingerprints (sweeps/progress.py) where they change nothing, so recorded results
are still found. The checkpoint fingerprint (distributed/checkpoint.py) does the same for checkpoints.
Renamed keys (``RENAMED``) load from old run directories under their new name and enter every
fingerprint under the name they were recorded with (``recorded_names``).
"""

from __future__ import annotations

from typing import Any

from .config import RENAMED, RunConfig
from .config_parse import apply_renames


def recorded_names(data: dict[str, Any]) -> dict[str, Any]:
    """A ``RunConfig.to_dict()`` with renamed keys under their old names, for fingerprints: a rename alone
    leaves every recorded result, progress entry and checkpoint findable."""
    return apply_renames(data, {(section, new): old for (section, old), new in RENAMED.items()})


# Keys added later whose value here reproduces what every run before them computed: a fingerprint leaves such a
# key out at that value, so recorded results and checkpoints are still found.
# (A section of None is a top-level key.)
ADDED_AT_OLD_MEANING: dict[tuple[str | None, str], Any] = {
    ("perturbation", "noise"): "generator", (None, "mlflow"): "", (None, "wandb"): "",
    ("cluster", "min_replicas"): 0, ("cluster", "replace_timeout_s"): 60.0, ("task", "lora_blocks"): 0}


def fingerprint_data(data: dict[str, Any]) -> dict[str, Any]:
    """A ``RunConfig.to_dict()`` as fingerprints hash it: renamed keys under their old names
    (``recorded_names``), and keys of ``ADDED_AT_OLD_MEANING`` left out where they hold that meaning."""
    data = recorded_names(data)
    for (section, key), value in ADDED_AT_OLD_MEANING.items():
        if section is None:
            if data.get(key, value) == value:
                data = {k: v for k, v in data.items() if k != key}
            continue
        part = data.get(section)
        if isinstance(part, dict) and part.get(key, value) == value:
            data = {**data, section: {k: v for k, v in part.items() if k != key}}
    return data


def saved_config(data: dict[str, Any]) -> RunConfig:
    """A run directory's config.yaml as a ``RunConfig``, keeping the meaning it was written with.

    A config.yaml written before ``optimizer.step_scaling`` existed averaged a step's directions without
    scaling, so it loads with ``step_scaling: none`` (a resumed old run continues as it started); keys
    written under an old name (``RENAMED``) load under the new one.
    """
    data = apply_renames(data or {}, RENAMED)  # silently: the file is the run's, not the user's mistake
    optimizer = data.get("optimizer")
    if isinstance(optimizer, dict) and "step_scaling" not in optimizer:
        data = {**data, "optimizer": {**optimizer, "step_scaling": "none"}}
    return RunConfig.from_dict(data)


def trajectory_dict(config: RunConfig) -> dict[str, Any]:
    """``config.to_dict()`` without the keys that change nothing for this config, for result fingerprints.

    Left out: ``optimizer.step_scaling`` and ``optimizer.tuned_directions`` when the step factor at the
    config's directions per step is 1 (``none``, or Q = tuned_directions), and ``cluster.batch_scaling``
    when it is ``weak`` (what data mode did before the key existed), and what ``fingerprint_data`` leaves
    out. Results recorded before these keys
    existed (sweeps/progress.py) keep their fingerprints, and a change that does compute something else
    changes the fingerprint.
    """
    data = fingerprint_data(config.to_dict())
    o = config.optimizer
    if o.step_scaling == "none" or config.directions_per_step == o.tuned_directions:
        del data["optimizer"]["step_scaling"], data["optimizer"]["tuned_directions"]
    if config.cluster.batch_scaling == "weak":
        del data["cluster"]["batch_scaling"]
    return data
