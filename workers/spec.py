"""Model specs and the serve config file that lists them.

The operator's config file is the only place an import path (``factory``) comes from: a client
can only name a model ``id`` that the config allows.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import logging
import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nosq.producer.codec import DTYPES
from nosq.producer.errors import NosqError
from nosq.workers.profiles.curve import EXAMPLE_OPTION

__all__ = ["Bucketing", "ConfigError", "ItemSchema", "ModelSpec", "ServeConfig", "load_config"]

log = logging.getLogger(__name__)
# the built-in factories as spelled before the nosq namespace ("workers.demo:mlp"): still accepted,
# read as their nosq.workers name (so both spellings share one fingerprint), with a warning
_OLD_BUILTIN_FACTORY_RE = re.compile(r"^workers\.(demo|text):", re.ASCII)
_FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$", re.ASCII)
_METHOD_RE = re.compile(r"^[A-Za-z]\w*$", re.ASCII)
# torch.compile's modes (``torch._inductor.list_mode_options``); "default" is what None means
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# fields added after fingerprints were first stored: left out of the canonical JSON at their
# default, so a spec that does not use them keeps the fingerprint (and the profiles) it had
_FINGERPRINT_IF_SET = {"compile": "eager", "compile_mode": None}
# where compiled artifacts live does not change the model: never part of the fingerprint
_NOT_FINGERPRINTED = ("compile_cache_dir", "input", "max_backlog", "partitions", "min_replicas", "max_replicas",
                      "scale_up_delay_s", "scale_down_delay_s", "scale_target_wait_s",
                      "bucketing")  # how batches are formed, not the model
# nor does where its replicas run (custom Ray resources): moving a model keeps its profiles
_PLACEMENT_FIELDS = ("resources",)
# Ray's built-in resources: each has a field of its own (num_cpus, device), or none to give
_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


class ConfigError(NosqError, ValueError):
    """A config file that cannot be read or does not describe a valid set of models."""


class ItemSchema(BaseModel):
    """One input item of a model, e.g. ``{dtype = "float32", shape = [512]}`` (no batch dimension)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: str
    shape: tuple[int, ...]

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"dtype {value!r} is not a wire dtype: use one of {', '.join(DTYPES)}")
        return value

    @field_validator("shape")
    @classmethod
    def _check_shape(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < 0 for d in value):
            raise ValueError(f"shape {list(value)!r} must be sizes >= 0")
        return value


class Bucketing(BaseModel):
    """Batches formed by length (``nosq.manager.serving.batcher.LengthBuckets``), for models whose cost grows
    with the length of each item (text): a request's bucket is the smallest edge (in tokens) at
    or above its estimated token count, payload bytes / ``bytes_per_token`` (the manager never
    decodes a payload); a batch takes requests of the oldest request's bucket, then of the
    nearest others, while batch size x its longest bucket stays within ``token_budget``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    edges: tuple[int, ...] = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    token_budget: int = Field(default=2048, ge=1)  # padded tokens of one batch: size x its longest bucket
    bytes_per_token: float = Field(default=4.0, gt=0)  # payload bytes per token, the manager's length proxy

    @field_validator("edges")
    @classmethod
    def _check_edges(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(e < 1 for e in value) or any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError(f"bucketing.edges must be token counts >= 1 in increasing order, got {list(value)!r}")
        return value


class ModelSpec(BaseModel):
    """One servable model: where to build it, which methods clients may call, how to batch it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    factory: str
    methods: tuple[str, ...] = ("forward",)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    replicas: int = Field(default=1, ge=1)
    max_batch: int = Field(default=64, ge=1, le=65536)
    latency_budget_ms: float = Field(default=100.0, gt=0)
    max_wait_ms: float = Field(default=2.0, ge=0)
    num_cpus: float = Field(default=1.0, ge=0)
    threads: int | None = Field(default=None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)
    # one input item's dtype and shape: items of another layout are answered bad_request, numeric
    # lists are converted to it, and batches of it are decoded straight into one buffer
    input: ItemSchema | None = None
    max_backlog: int | None = Field(default=None, ge=1)  # entries waiting before producers get QueueFull
    # request streams: more than one spreads a hot model's queue over a Redis Cluster's masters
    # (``keys.partition_tags``); max_backlog is then split evenly over them
    partitions: int = Field(default=1, ge=1, le=64)
    # batches by length (text models): None forms them in arrival order, up to max_batch items
    bucketing: Bucketing | None = None
    # eager, torch.jit.trace per batch bucket, or torch.compile (``nosq.workers.compiling``)
    compile: Literal["eager", "trace", "compile"] = "eager"
    compile_mode: str | None = None  # torch.compile's mode; only with compile = "compile"
    compile_cache_dir: str | None = None  # default: ~/.cache/nosq/compile
    # custom Ray resources each replica needs, e.g. {node_a = 1}: pins the model to the nodes
    # started with them (``ray start --resources``); placement only, not part of the fingerprint
    resources: dict[str, float] = Field(default_factory=dict)
    # autoscaling (nosq.manager.scaling.policy): on when max_replicas > min_replicas; both default to replicas.
    # min_replicas = 0 (scale to zero) unloads the model when idle: it needs on-demand loading
    min_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int | None = Field(default=None, ge=1)
    scale_up_delay_s: float = Field(default=5.0, ge=0)  # how long more replicas must be wanted before adding
    scale_down_delay_s: float = Field(default=30.0, ge=0)  # how long fewer must do before retiring
    scale_target_wait_s: float = Field(default=1.0, gt=0)  # the backlog should drain within this

    @field_validator("factory")
    @classmethod
    def _check_factory(cls, value: str) -> str:
        if not _FACTORY_RE.fullmatch(value):
            raise ValueError(f"factory must look like 'package.module:function', got {value!r}")
        if _OLD_BUILTIN_FACTORY_RE.match(value):
            log.warning("factory %r: the built-in models are nosq.%s now; write that in the config", value, value)
            return f"nosq.{value}"
        return value

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("methods must name at least one method, e.g. ['forward']")
        bad = [m for m in value if not _METHOD_RE.fullmatch(m)]
        if bad:
            raise ValueError(f"method names must be public identifiers (no leading '_'), got {bad!r}")
        if len(set(value)) != len(value):
            raise ValueError(f"methods are listed twice: {list(value)!r}")
        return value

    @field_validator("options")
    @classmethod
    def _check_example(cls, value: dict[str, Any]) -> dict[str, Any]:
        example = value.get(EXAMPLE_OPTION)
        if example is None or isinstance(example, list):
            return value
        shape = example.get("shape") if isinstance(example, Mapping) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or \
                not isinstance(example.get("dtype", "float32"), str):
            raise ValueError(f"options.{EXAMPLE_OPTION} describes one input item for profiling: "
                             f'{{dtype = "float32", shape = [3, 64, 64]}} or a list of numbers, got {example!r}')
        return value

    @field_validator("compile_cache_dir")
    @classmethod
    def _check_cache_dir(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("compile_cache_dir must be a directory path; leave it out for ~/.cache/nosq/compile")
        return value

    @field_validator("resources")
    @classmethod
    def _check_resources(cls, value: dict[str, float]) -> dict[str, float]:
        builtin = sorted(set(value) & _BUILTIN_RESOURCES)
        if builtin:
            raise ValueError(f"resources names Ray's built-in {builtin!r}: use num_cpus for CPUs and device for "
                             "GPUs; resources is for custom ones such as {node_a = 1}")
        # Ray takes fractions up to 1 and whole numbers above
        bad = {name: amount for name, amount in value.items()
               if not name.strip() or not math.isfinite(amount) or amount < 0 or (amount > 1 and amount % 1)}
        if bad:
            raise ValueError(f"resources must map custom resource names to amounts >= 0 (a fraction up to 1, "
                             f"a whole number above), e.g. {{node_a = 1}}; got {bad!r}")
        return value

    @model_validator(mode="after")
    def _check_compile_mode(self) -> ModelSpec:
        if self.compile_mode is None:
            return self
        if self.compile != "compile":
            raise ValueError(f"compile_mode {self.compile_mode!r} needs compile = \"compile\" "
                             f"(compile is {self.compile!r})")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        return self

    @model_validator(mode="after")
    def _check_replica_bounds(self) -> ModelSpec:
        low, high = self.replica_bounds
        if not low <= self.replicas <= high:
            raise ValueError(f"min_replicas <= replicas <= max_replicas must hold, got {low} <= {self.replicas} <= "
                             f"{high} (a bound left out defaults to replicas, the count the model starts with)")
        return self

    @property
    def replica_bounds(self) -> tuple[int, int]:
        """(min, max) replicas the autoscaler keeps; each defaults to ``replicas``. Equal: no autoscaling."""
        low = self.replicas if self.min_replicas is None else self.min_replicas
        high = self.replicas if self.max_replicas is None else self.max_replicas
        return low, high

    def fingerprint(self) -> str:
        """First 16 hex chars of the sha256 of this spec's canonical JSON (sorted keys).

        ``compile`` and ``compile_mode`` count only when set (a profile of the compiled model
        is a different profile); ``compile_cache_dir`` never does."""
        data = self.model_dump(mode="json")
        for key in (*_NOT_FINGERPRINTED, *_PLACEMENT_FIELDS):
            data.pop(key, None)
        for key, default in _FINGERPRINT_IF_SET.items():
            if data.get(key) == default:
                data.pop(key, None)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class ServeConfig(BaseModel):
    """The set of models one deployment may serve; ids are unique."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: tuple[ModelSpec, ...]

    @model_validator(mode="after")
    def _unique_ids(self) -> ServeConfig:
        seen: set[str] = set()
        for spec in self.models:
            if spec.id in seen:
                raise ValueError(f"model id {spec.id!r} is listed more than once; ids must be unique")
            seen.add(spec.id)
        return self

    def model(self, model_id: str) -> ModelSpec:
        """The spec of ``model_id``; ``KeyError`` naming the configured ids if there is none."""
        for spec in self.models:
            if spec.id == model_id:
                return spec
        known = ", ".join(s.id for s in self.models) or "none"
        raise KeyError(f"unknown model {model_id!r}; configured models: {known}")


def load_config(path: Path) -> ServeConfig:
    """Read a serve config from TOML (``[[models]]`` tables) or YAML (``models:`` list).

    Raises ``ConfigError`` naming the file and every problem found in it.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"{path}: unsupported config type {suffix!r}; use .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from exc
    data = _parse_toml(path, text) if suffix == ".toml" else _parse_yaml(path, text)
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{path}: the top level must be a mapping with a 'models' list, got {type(data).__name__}"
        )
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  - {line}" for line in _describe(exc, data))
        raise ConfigError(f"{path}: invalid config ({exc.error_count()} problem(s)):\n{problems}") from exc


def _parse_toml(path: Path, text: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        yaml: Any = importlib.import_module("yaml")  # PyYAML ships no type stubs
    except ImportError as exc:
        raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml)") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def _describe(exc: ValidationError, data: Mapping[str, Any]) -> list[str]:
    """One line per pydantic error: where (``models[1] (id 'mlp').factory``), what, and the value."""
    lines = []
    for err in exc.errors():
        where = _location(err["loc"], data)
        message = err["msg"].removeprefix("Value error, ")
        line = f"{where}: {message}"
        # our own validators name the bad value; pydantic's built-in checks do not
        if err["type"] not in ("value_error", "missing", "model_type") and not isinstance(
            err["input"], Mapping
        ):
            line += f" (got {err['input']!r})"
        lines.append(line)
    return lines


def _location(loc: tuple[int | str, ...], data: Mapping[str, Any]) -> str:
    parts: list[str] = []
    for i, key in enumerate(loc):
        if isinstance(key, int):
            parts.append(f"[{key}]")
            if i == 1 and loc[0] == "models":
                model_id = _model_id(data, key)
                if model_id is not None:
                    parts.append(f" (id {model_id!r})")
        else:
            parts.append(f".{key}" if parts else key)
    return "".join(parts) or "config"


def _model_id(data: Mapping[str, Any], index: int) -> str | None:
    models = data.get("models")
    if isinstance(models, list) and 0 <= index < len(models) and isinstance(models[index], Mapping):
        model_id = models[index].get("id")
        return model_id if isinstance(model_id, str) else None
    return None
