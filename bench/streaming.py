"""Samples/s of the streaming reader from an S3 server vs a raw sequential boto3 download of the same shards.

In one invocation:

1. a moto S3 server in its own process on 127.0.0.1 (a store is another process: it must not share
   this process's GIL), and ``--mb`` MiB of random uint16 tokens (vocabulary 2048, as the
   quickstart) written in the real shard format (:class:`lmforge.data.shards.ShardWriter`,
   ``--shard-mb`` MiB per shard: the default is prepare's default shard of 2**24 tokens, so every
   shard is one whole-object GET);
2. *raw*: ``get_object(...)["Body"].read()`` of every shard, one after the other, with a default
   boto3 client made before the clock starts: bytes/s, and the samples/s they equal at each shape
   (a sample advances ``contextLength`` tokens); run before and after the loaders, the faster of
   the two is the baseline (the run after has the allocator tuning the first reader sets for the
   whole process, :mod:`lmforge.data.allocator`, which speeds a plain download up as well); and
   *raw ranged*: the same shards as ``--range-mb`` ranged GETs, the ranged loader's baseline (moto
   reads a whole object for each ranged GET, so on this server ranges cost more than on S3);
3. *loader*: a fresh :class:`lmforge.data.reader.SampleReader` (its clients made before the clock;
   its default cache: in memory, empty, bounded to the order's working set; shuffled with the
   default ``data.shuffleWindow``; default prefetch) reads two epochs in micro-batches (the first
   with its startup, the second the steady state of a longer run), with
   whole-object GETs and again with ``--range-mb`` ranged GETs, at two shapes: examples/pretrain.yaml's
   (contextLength 1024, micro-batch 16: the scale streaming is for) and the quickstart's
   (contextLength 128, micro-batch 8: 8 samples per call at 2.6M raw samples/s leave about 3 us per
   Python call, so that ratio measures the call, not the stream);
4. the same reader over the same shards on local disk (the consumer's own ceiling);
5. what the quickstart consumes: tokens/s of a short real ``lmforge run examples/quickstart.yaml``
   (``--quickstart-steps`` steps, median logged tokens/s after the first log interval, all ranks)
   divided by its contextLength; ``--quickstart-tps`` skips the run and uses the given figure.

    python bench/streaming.py [--mb 4096] [--shard-mb 32] [--range-mb 4] [--quickstart-steps 40]

Targets: loader / raw >= 0.9; loader / quickstart consumption >= 10.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.api.common import S3Settings  # noqa: E402
from lmforge.data.reader import SampleReader, StreamSettings  # noqa: E402
from lmforge.data.shards import ShardWriter  # noqa: E402
from lmforge.data.storage import S3Storage  # noqa: E402

QUICKSTART = REPO / "examples" / "quickstart.yaml"
PRETRAIN = REPO / "examples" / "pretrain.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


def raw_download(client, keys: list[str], range_bytes: int | None = None) -> tuple[float, int]:
    """Every shard, one GET after the other: whole objects, or ``range_bytes`` ranged GETs."""
    started = time.perf_counter()
    total = 0
    for key in keys:
        if range_bytes is None:
            total += len(client.get_object(Bucket="bench", Key=key)["Body"].read())
            continue
        size = client.head_object(Bucket="bench", Key=key)["ContentLength"]
        for start in range(0, size, range_bytes):
            span = f"bytes={start}-{min(size, start + range_bytes) - 1}"
            total += len(client.get_object(Bucket="bench", Key=key, Range=span)["Body"].read())
    return time.perf_counter() - started, total


@dataclass
class LoaderRun:
    first_batch: float  # seconds from a fresh reader to its first batch (the first window's blocks)
    first_epoch: float  # seconds for epoch 1, startup included
    steady: float  # seconds for epoch 2, from the end of epoch 1: fetch and consumption overlapped
    samples: int  # per epoch
    fetched: int  # bytes fetched in both epochs


def loader_epochs(endpoint: str, context: int, batch: int, settings: StreamSettings) -> LoaderRun:
    """Two epochs of a fresh reader. Near the end of an epoch the prefetcher already fetches the next
    epoch's first window (work the next epoch needs), so epoch 2, which ends the same way epoch 1
    did, is the steady state a training run sees."""
    storage = S3Storage(S3Settings(endpoint=endpoint, addressingStyle="path"))
    storage.client, storage.fetch_client  # noqa: B018 - made before the clock starts, as the raw run's client is
    gc.collect()
    gc.freeze()  # as the trainer does before its loop: setup objects stay out of full collections
    started = time.perf_counter()
    reader = SampleReader("s3://bench/train", storage, context, seed=0, settings=settings)  # default cache
    steps = reader.num_samples // batch
    reader.next_batch(batch)
    first_batch = time.perf_counter() - started
    for _ in range(steps - 1):
        reader.next_batch(batch)
    first_epoch = time.perf_counter() - started
    reader.load_state_dict({"position": reader.num_samples})  # epoch 2 starts at its first position
    for _ in range(steps):
        reader.next_batch(batch)
    steady = time.perf_counter() - started - first_epoch
    fetched = reader.bytes_fetched
    reader.close()
    return LoaderRun(first_batch, first_epoch, steady, steps * batch, fetched)


def local_epoch(uri: str, context: int, batch: int) -> tuple[float, int]:
    """The same reader over the same shards on local disk: what the consumer side (batch building)
    alone can do, i.e. the ceiling any S3 path can reach in this process."""
    from lmforge.data.storage import LocalStorage

    reader = SampleReader(uri, LocalStorage(), context, seed=0)
    reader.next_batch(batch)  # page the files in: the S3 runs read from a cache that was just written
    started = time.perf_counter()
    for _ in range(reader.num_samples // batch - 1):
        reader.next_batch(batch)
    seconds = time.perf_counter() - started
    return seconds, reader.samples_read - batch


def quickstart_consumption(steps: int) -> float:
    """Median tokens/s (all ranks) of a short real quickstart run."""
    job = yaml.safe_load(QUICKSTART.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        training = job["spec"]["training"]
        training.update({"maxSteps": steps, "evalInterval": 10**6, "logInterval": 10})
        job["spec"]["checkpoint"] = {"interval": 10**6, "keep": 1}
        job["spec"]["output"] = {"uri": f"file://{tmp}/out"}
        job["spec"]["data"]["sources"] = [f"file://{REPO}/examples/data/python-docs.txt"]
        path = Path(tmp) / "job.yaml"
        path.write_text(yaml.safe_dump(job))
        env = {**os.environ, "LMFORGE_METRICS_PORT": str(free_port()), "MASTER_PORT": str(free_port())}
        done = subprocess.run(
            [sys.executable, "-m", "lmforge.cli", "run", str(path)], cwd=tmp, env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(f"quickstart run failed ({done.returncode}):\n{done.stderr[-3000:]}")
        records = [json.loads(line) for line in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
        rates = [r["tokens_per_second"] for r in records if "tokens_per_second" in r][1:]
        return statistics.median(rates)


def shape_of(path: Path) -> tuple[int, int]:
    job = yaml.safe_load(path.read_text())
    return int(job["spec"]["model"]["contextLength"]), int(job["spec"]["training"]["microBatchSize"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--mb", type=int, default=4096, help="MiB of tokens to stream (several times the reader's working set)"
    )
    parser.add_argument("--shard-mb", type=int, default=32, help="MiB per shard")
    parser.add_argument("--range-mb", type=int, default=4, help="ranged GET size of the ranged runs")
    parser.add_argument("--quickstart-steps", type=int, default=40)
    parser.add_argument("--quickstart-tps", type=float, default=None, help="skip the quickstart run")
    args = parser.parse_args()

    shapes = {"pretrain": shape_of(PRETRAIN), "quickstart": shape_of(QUICKSTART)}
    vocab = int(yaml.safe_load(QUICKSTART.read_text())["spec"]["tokenizer"]["vocabSize"])
    tokens = args.mb * (1 << 20) // 2
    shard_tokens = args.shard_mb * (1 << 20) // 2

    def write_shards(uri: str, storage: object) -> None:
        rng = np.random.default_rng(0)
        with ShardWriter(uri, storage, "bench", vocab, shard_tokens=shard_tokens) as w:  # type: ignore[arg-type]
            for start in range(0, tokens, 1 << 22):
                w.add(rng.integers(0, vocab, size=min(1 << 22, tokens - start)))

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    proc, endpoint = start_moto()
    runs: dict[tuple[str, str], LoaderRun] = {}
    try:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(s3={"addressing_style": "path"})
        )
        client.create_bucket(Bucket="bench")
        write_shards("s3://bench/train", S3Storage(S3Settings(endpoint=endpoint, addressingStyle="path")))
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="bench")["Contents"] if o["Key"].endswith(".bin"))
        print(f"data: {len(keys)} shards of {args.shard_mb} MiB, {tokens * 2 / 2**20:.0f} MiB of uint16 tokens")

        raw_first = raw_download(client, keys)
        ranged_settings = StreamSettings.from_env()
        ranged_settings.range_threshold = args.range_mb << 20
        ranged_settings.range_bytes = args.range_mb << 20
        for name, (context, batch) in shapes.items():
            runs[name, "whole"] = loader_epochs(endpoint, context, batch, StreamSettings.from_env())
            runs[name, "ranged"] = loader_epochs(endpoint, context, batch, ranged_settings)
        raw_second = raw_download(client, keys)
        raw_ranged = raw_download(client, keys, args.range_mb << 20)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    raw_seconds, raw_bytes = min(raw_first, raw_second)
    raw_bps = raw_bytes / raw_seconds
    print(f"raw boto3 sequential download: {raw_bps / 2**20:.1f} MiB/s", end="")
    print(f" (runs: {raw_first[1] / raw_first[0] / 2**20:.1f} and {raw_second[1] / raw_second[0] / 2**20:.1f} MiB/s)")
    ranged_bps = raw_ranged[1] / raw_ranged[0]
    print(
        f"raw boto3 sequential ranged download ({args.range_mb} MiB GETs): {ranged_bps / 2**20:.1f} MiB/s "
        "(moto reads the whole object for every ranged GET: the baseline for the ranged loader)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        from lmforge.data.storage import LocalStorage

        write_shards(f"file://{tmp}/train", LocalStorage())
        local = {name: local_epoch(f"file://{tmp}/train", *shape) for name, shape in shapes.items()}

    for name, (context, batch) in shapes.items():
        raw_sps = raw_bps / (context * 2)
        print(f"\n{name} shape: contextLength {context}, micro-batch {batch}; raw = {raw_sps:,.0f} samples/s")
        for kind, label in (("whole", "whole-object GETs"), ("ranged", f"ranged GETs ({args.range_mb} MiB)")):
            run = runs[name, kind]
            steady, first = run.samples / run.steady, run.samples / run.first_epoch
            base = raw_sps if kind == "whole" else ranged_bps / (context * 2)
            versus = "raw" if kind == "whole" else "raw ranged"
            print(
                f"  loader, {label}: steady (epoch 2) {steady:,.0f} samples/s, loader / {versus} = {steady / base:.2f} "
                f"(target >= 0.9); epoch 1 with startup {first:,.0f} samples/s = {first / base:.2f} x {versus}, "
                f"first batch after {run.first_batch:.2f} s; fetched {run.fetched / raw_bytes:.2f}x the data (2 epochs)"
            )
        local_sps = local[name][1] / local[name][0]
        print(f"  same reader over local files (the consumer's own ceiling): {local_sps:,.0f} samples/s", end="")
        print(f" = {local_sps / raw_sps:.2f} x raw")

    if args.quickstart_tps is not None:
        tps, source = args.quickstart_tps, "given with --quickstart-tps"
    else:
        tps, source = quickstart_consumption(args.quickstart_steps), f"measured: {args.quickstart_steps}-step run here"
    context = shapes["quickstart"][0]
    consumed = tps / context
    run = runs["quickstart", "whole"]
    print(f"\nquickstart consumes {tps:,.0f} tokens/s = {consumed:,.1f} samples/s ({source}, all ranks)")
    ratio = run.samples / run.first_epoch / consumed
    print(f"loader (quickstart shape, whole-object GETs, epoch 1) / quickstart consumption = {ratio:,.0f}x", end="")
    print(" (target >= 10x)")


if __name__ == "__main__":
    main()
