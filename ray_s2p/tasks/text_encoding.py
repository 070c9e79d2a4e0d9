"""Text data to encoded examples: tokenizers, tokenisation (``datasets.map``), train/validation/test splits.

``task.options.tokenizer`` picks the tokenizer: ``auto`` (default: the model's own;
for tiny random models the bundled MiniLM WordPiece vocabulary when the package is
installed, else a word-level vocabulary built from the data), ``minilm``,
``word`` (always the data-built word-level one; what the unit tests use, so they
need no asset), or a folder / hub name.

Examples are padded on the right to ``max_length`` and turned into tensors once;
batches cut the all-padding columns (``batching.Examples.take``). ``datasets.map``
runs with ``keep_in_memory`` so no cache file is written anywhere.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import datasets
import torch

from ..config import TaskConfig
from ..data.batching import Examples, split_rows
from ..data.sources import check_label_range, labels_to_ids, load_source, package_dir, require_columns
from .errors import TaskError, brief
from .hf_models import MINILM_PACKAGE, TINY_MODELS, resolve_model_path

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def build_word_tokenizer(texts: Iterable[str], extra_words: Sequence[str] = (), max_vocab: int = 8192) -> Any:
    """A lower-casing word-level tokenizer whose vocabulary is the data's most frequent words.

    Ties in frequency are broken alphabetically, so every replica builds the same
    vocabulary. ``extra_words`` (label words) are always in it.

    Returns:
        A ``PreTrainedTokenizerFast`` (saves and reloads with ``AutoTokenizer``) that wraps
        single sequences as ``[CLS] ... [SEP]`` and pads with ``[PAD]`` (id 0).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    splitter = pre_tokenizers.Whitespace()

    def words(text: str) -> list[str]:
        return [w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))]

    counts = Counter(w for text in texts for w in words(text))
    forced = [w for word in extra_words for w in words(word)]
    ranked = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    vocab: dict[str, int] = {}
    for token in [*SPECIALS, *forced, *ranked]:
        if token not in vocab and len(vocab) < max_vocab + len(SPECIALS) + len(forced):
            vocab[token] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizer
    core.pre_tokenizer = splitter
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", eos_token="[SEP]")


def resolve_tokenizer(choice: str, model: str, texts: Sequence[str], extra_words: Sequence[str] = (),
                      max_vocab: int = 8192, trust_remote_code: bool = False) -> Any:
    """The tokenizer for ``task.model`` under ``task.options.tokenizer`` (see the module docstring).

    Raises:
        TaskError: the tokenizer cannot be loaded.
    """
    from transformers import AutoTokenizer

    field = "task.options.tokenizer"
    if choice == "auto":
        field = "task.model"
        if model in TINY_MODELS:
            choice = "minilm" if package_dir(MINILM_PACKAGE) is not None else "word"
        else:
            choice = model
    if choice == "word":
        tokenizer = build_word_tokenizer(texts, extra_words, max_vocab)
    else:
        path = resolve_model_path(choice)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise TaskError(f"{field} {choice!r}: cannot load its tokenizer ({brief(exc)}). Fix: use minilm, "
                            f"smollm2, tiny-bert, tiny-gpt2 or a local model folder; or set task.options.tokenizer "
                            f"to word, minilm or a tokenizer folder") from exc
    if tokenizer.pad_token_id is None:  # GPT-2 style tokenizers: pad with eos; the mask hides it
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def end_token_id(tokenizer: Any) -> int | None:
    """The id closing a causal-LM example: eos, or BERT's [SEP] when there is no eos."""
    for value in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if value is not None:
            return int(value)
    return None


def _fingerprint(*parts: Any) -> str:
    # datasets would otherwise hash the tokenizer with dill on every map (slow, and it warns).
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


def encode_texts(rows: datasets.Dataset, tokenizer: Any, *, column: str, max_length: int, mode: str,
                 template: str = "{text}") -> dict[str, torch.Tensor]:
    """Tokenise one text column into ``input_ids`` and ``attention_mask`` tensors of shape (N, max_length).

    Args:
        rows: the data set.
        tokenizer: a transformers tokenizer.
        column: the text column.
        max_length: tokens per example after truncation.
        mode: ``classify`` (with the tokenizer's special tokens, truncating the end),
            ``prompt`` (``template`` with ``{text}`` filled in, no special tokens, truncating the
            start so the template's ending and the answer position survive), or ``lm`` (no special
            tokens, the end token appended).
        template: prompt template for ``prompt`` mode.
    """
    end_id = end_token_id(tokenizer)
    pad_id = int(tokenizer.pad_token_id)
    if len(rows) == 0:  # eval_size 0: no eval examples
        empty = torch.zeros(0, max_length, dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone()}

    if mode == "prompt":
        tokenizer.truncation_side = "left"  # cut the start of the review, never the template's ending
    budget = max_length - 1 if mode == "lm" and end_id is not None else max_length

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = ["" if t is None else str(t) for t in batch[column]]
        if mode == "prompt":
            texts = [template.replace("{text}", t) for t in texts]
        ids = tokenizer(texts, add_special_tokens=mode == "classify", truncation=True, max_length=budget)["input_ids"]
        out_ids, out_mask = [], []
        for seq in ids:
            if mode == "lm" and end_id is not None:
                seq = seq + [end_id]
            pad = max_length - len(seq)
            out_ids.append(seq + [pad_id] * pad)
            out_mask.append([1] * len(seq) + [0] * pad)
        return {"input_ids": out_ids, "attention_mask": out_mask}

    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one bar per replica per split is noise; restored below
    try:
        encoded = rows.map(encode, batched=True, batch_size=1000, keep_in_memory=True,
                           remove_columns=rows.column_names,
                           new_fingerprint=_fingerprint(mode, column, max_length, template, len(rows)))
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    table = encoded.with_format("torch")[:]
    return {"input_ids": table["input_ids"].to(torch.long), "attention_mask": table["attention_mask"].to(torch.long)}


@dataclass(frozen=True)
class TextSplits:
    """Encoded train and evaluation examples of a text task.

    Attributes:
        train, eval: ``input_ids``, ``attention_mask`` and (labelled tasks) ``labels`` tensors; ``eval`` holds the
            split ``task.eval_split`` names (validation or test).
        tokenizer: the tokenizer used (saved with the model).
        num_labels: classes (labelled tasks), else None.
        label_names: class names when known.
    """

    train: Examples
    eval: Examples
    tokenizer: Any
    num_labels: int | None
    label_names: tuple[str, ...] | None


def load_text_splits(cfg: TaskConfig, *, mode: str, labelled: bool, num_labels: int | None = None,
                     extra_words: Sequence[str] = ()) -> TextSplits:
    """Load ``task.dataset``, check it, split it with ``task.split_seed`` and tokenise the chosen rows.

    The split (and k-shot sampling) never depends on the run seed (``batching.split_rows``).

    Args:
        cfg: the task config (dataset, columns, sizes, split seed, eval split, k_shot, model, template, options).
        mode: ``classify``, ``prompt`` or ``lm`` (see ``encode_texts``).
        labelled: whether the task needs the label column.
        num_labels: a fixed class count (prompt tasks: the number of label words); else
            ``task.num_labels`` or the data's classes.
        extra_words: words the data-built vocabulary must contain (label words).

    Raises:
        DataError: missing column, empty data, labels that are not integers or out of range.
    """
    opts = cfg.options
    data = load_source(cfg.dataset, opts)
    columns = [cfg.text_column] + ([cfg.label_column] if labelled else [])
    require_columns(data.rows, columns, cfg.dataset)
    if data.held_out is not None:
        require_columns(data.held_out, columns, cfg.dataset + " (held-out split)")
    label_names = tuple(opts["label_names"]) if opts.get("label_names") else data.label_names
    labels = held_labels = None
    if labelled:
        given = opts.get("label_names")
        labels = labels_to_ids(data.rows[cfg.label_column], cfg.label_column, given)
        held_labels = (labels_to_ids(data.held_out[cfg.label_column], cfg.label_column, given)
                       if data.held_out is not None else [])
        inferred = len(label_names) if label_names else max(labels + held_labels) + 1
        num_labels = num_labels or cfg.num_labels or inferred
        check_label_range(labels + held_labels, num_labels, cfg.label_column)
    split = split_rows(len(data.rows), split_seed=cfg.split_seed, eval_size=cfg.eval_size, test_size=cfg.test_size,
                       labels=labels, k_shot=cfg.k_shot, train_size=cfg.train_size,
                       held_out_rows=len(data.held_out) if data.held_out is not None else None)
    texts = data.rows[cfg.text_column]
    tokenizer = resolve_tokenizer(str(opts.get("tokenizer", "auto")), cfg.model, texts, extra_words,
                                  int(opts.get("vocab_size", 8192)), cfg.trust_remote_code)
    eval_source = data.held_out if split.eval_from_held_out else data.rows
    eval_labels = held_labels if split.eval_from_held_out else labels
    id_offset = len(data.rows) if split.eval_from_held_out else 0  # ids must differ between the two sources

    def examples(source: datasets.Dataset, rows: torch.Tensor, source_labels: list[int] | None,
                 offset: int) -> Examples:
        tensors = encode_texts(source.select(rows.tolist()), tokenizer, column=cfg.text_column,
                               max_length=cfg.max_length, mode=mode, template=cfg.template)
        if source_labels is not None:
            tensors["labels"] = torch.as_tensor(source_labels, dtype=torch.long)[rows]
        return Examples(tensors, rows + offset, seq_keys=("input_ids", "attention_mask"))

    return TextSplits(examples(data.rows, split.train, labels, 0),
                      examples(eval_source, split.evaluated(cfg.eval_split), eval_labels, id_offset),
                      tokenizer, num_labels if labelled else None, label_names)
