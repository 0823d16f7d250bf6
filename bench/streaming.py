"""Samples/s of the streaming reader from an S3 server vs a raw sequential boto3 download of the same shards.

In one invocation:

1. a moto S3 server in its own process on 127.0.0.1 (a store is another process: it must not share
   this process's GIL), and ``--mb`` MiB of random uint16 tokens (vocabulary 2048, as the
   quickstart) written in the real shard format (:class:`lmforge.data.shards.ShardWriter`,
   ``--shard-mb`` MiB per shard, so the default 16 MiB shards are whole-object GETs);
2. *raw*: ``get_object(...)["Body"].read()`` of every shard, one after the other, with a default
   boto3 client: bytes/s, and the samples/s it equals (a sample advances ``contextLength`` tokens);
   run before and after the loader, the faster of the two is the baseline;
3. *loader*: a fresh :class:`lmforge.data.reader.SampleReader` (empty cache, shuffled, default
   prefetch) reads one whole epoch in micro-batches of the quickstart's size; again with ranged GETs
   (``--range-mb`` blocks) instead of whole objects;
4. what the quickstart consumes: tokens/s of a short real ``lmforge run examples/quickstart.yaml``
   (``--quickstart-steps`` steps, median logged tokens/s after the first log interval, all ranks)
   divided by its contextLength; ``--quickstart-tps`` skips the run and uses the given figure.

    python bench/streaming.py [--mb 128] [--shard-mb 16] [--range-mb 4] [--quickstart-steps 40]

5. the same reader over the same shards on local disk: the consumer's own ceiling (building int64
   ``x`` and ``y`` batches), which bounds the loader / raw ratio whatever the storage does.

Targets: loader / raw >= 0.9; loader / quickstart consumption >= 10.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
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


def raw_download(client, keys: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    total = 0
    for key in keys:
        total += len(client.get_object(Bucket="bench", Key=key)["Body"].read())
    return time.perf_counter() - started, total


def loader_epoch(endpoint: str, context: int, batch: int, settings: StreamSettings) -> tuple[float, int, int]:
    storage = S3Storage(S3Settings(endpoint=endpoint, addressingStyle="path"))
    storage.fetch_client  # noqa: B018 - made before the clock starts, as the raw run's client is
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        reader = SampleReader("s3://bench/train", storage, context, seed=0, cache=Path(cache), settings=settings)
        for _ in range(reader.num_samples // batch):
            reader.next_batch(batch)
        seconds = time.perf_counter() - started
        samples, fetched = reader.samples_read, reader.bytes_fetched
        reader.close()
    return seconds, samples, fetched


def local_epoch(context: int, batch: int, tokens: int, vocab: int, shard_tokens: int) -> tuple[float, int]:
    """The same reader over the same kind of shards on local disk: what the consumer side (batch
    building) alone can do, i.e. the ceiling any S3 path can reach in this process."""
    from lmforge.data.storage import LocalStorage

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"file://{tmp}/train"
        with ShardWriter(uri, LocalStorage(), "bench", vocab, shard_tokens=shard_tokens) as w:
            for start in range(0, tokens, 1 << 22):
                w.add(rng.integers(0, vocab, size=min(1 << 22, tokens - start)))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=128, help="MiB of tokens to stream")
    parser.add_argument("--shard-mb", type=int, default=16, help="MiB per shard")
    parser.add_argument("--range-mb", type=int, default=4, help="ranged GET size of the ranged run")
    parser.add_argument("--quickstart-steps", type=int, default=40)
    parser.add_argument("--quickstart-tps", type=float, default=None, help="skip the quickstart run")
    args = parser.parse_args()

    job = yaml.safe_load(QUICKSTART.read_text())
    context = int(job["spec"]["model"]["contextLength"])
    batch = int(job["spec"]["training"]["microBatchSize"])
    vocab = int(job["spec"]["tokenizer"]["vocabSize"])

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    proc, endpoint = start_moto()
    try:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(s3={"addressing_style": "path"})
        )
        client.create_bucket(Bucket="bench")
        storage = S3Storage(S3Settings(endpoint=endpoint, addressingStyle="path"))
        tokens = args.mb * (1 << 20) // 2
        rng = np.random.default_rng(0)
        with ShardWriter("s3://bench/train", storage, "bench", vocab, shard_tokens=args.shard_mb * (1 << 20) // 2) as w:
            for start in range(0, tokens, 1 << 22):
                w.add(rng.integers(0, vocab, size=min(1 << 22, tokens - start)))
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="bench")["Contents"] if o["Key"].endswith(".bin"))
        print(f"data: {len(keys)} shards, {tokens * 2 / 2**20:.0f} MiB, contextLength {context}, micro-batch {batch}")

        raw_first = raw_download(client, keys)
        whole = loader_epoch(endpoint, context, batch, StreamSettings.from_env())
        ranged_settings = StreamSettings.from_env()
        ranged_settings.range_threshold = args.range_mb << 20
        ranged_settings.range_bytes = args.range_mb << 20
        ranged = loader_epoch(endpoint, context, batch, ranged_settings)
        raw_second = raw_download(client, keys)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    raw_seconds, raw_bytes = min(raw_first, raw_second)
    raw_bps = raw_bytes / raw_seconds
    raw_sps = raw_bps / (context * 2)
    print(f"raw boto3 sequential download: {raw_bps / 2**20:.1f} MiB/s = {raw_sps:,.0f} samples/s equivalent")
    print(f"  (runs: {raw_first[1] / raw_first[0] / 2**20:.1f} and {raw_second[1] / raw_second[0] / 2**20:.1f} MiB/s)")
    loader_rates = {}
    runs = (("whole-object GETs", whole), (f"ranged GETs ({args.range_mb} MiB)", ranged))
    for name, (seconds, samples, fetched) in runs:
        sps = samples / seconds
        loader_rates[name] = sps
        print(
            f"loader, {name}: {sps:,.0f} samples/s ({fetched / seconds / 2**20:.1f} MiB/s fetched, "
            f"{samples} samples in {seconds:.2f} s); loader / raw = {sps / raw_sps:.2f} (target >= 0.9)"
        )

    local_seconds, local_samples = local_epoch(context, batch, tokens, vocab, args.shard_mb * (1 << 20) // 2)
    local_sps = local_samples / local_seconds
    print(
        f"same reader over local files (the consumer's own ceiling, no S3): {local_sps:,.0f} samples/s = "
        f"{local_sps / raw_sps:.2f} x raw; S3 loader / local = {loader_rates['whole-object GETs'] / local_sps:.2f}"
    )

    if args.quickstart_tps is not None:
        tps, source = args.quickstart_tps, "given with --quickstart-tps"
    else:
        tps, source = quickstart_consumption(args.quickstart_steps), f"measured: {args.quickstart_steps}-step run here"
    consumed = tps / context
    best = loader_rates["whole-object GETs"]
    print(f"quickstart consumes {tps:,.0f} tokens/s = {consumed:,.1f} samples/s ({source}, all ranks)")
    print(f"loader (whole-object, one process) / quickstart consumption = {best / consumed:,.0f}x (target >= 10x)")


if __name__ == "__main__":
    main()
