"""The `lmforge` command: validate manifests, generate CRDs, run jobs locally."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge import __version__, contract, exitcodes
from lmforge.api.errors import Problem

app = typer.Typer(
    name="lmforge",
    help="Train and compress generative language models, locally or on Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def print_problems(problems: list[Problem]) -> None:
    """Problems to stderr, one per line, red 'error:' prefix on a terminal."""
    for problem in problems:
        typer.echo(typer.style("error: ", fg="red", bold=True) + str(problem), err=True)


@app.command()
def version() -> None:
    """Print the lmforge version."""
    typer.echo(__version__)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Manifest files (multi-document YAML).")],
) -> None:
    """Check TrainingJob and CompressionJob manifests; print every problem with its field and fix."""
    from lmforge.api.loading import load_manifests

    manifests, problems = load_manifests(list(files))
    if problems:
        print_problems(problems)
        count = len(problems)
        typer.echo(f"{count} problem{'s' if count != 1 else ''} found.", err=True)
        raise typer.Exit(exitcodes.PROBLEMS_FOUND)
    for manifest in manifests:
        typer.echo(f"ok: {manifest.kind} {manifest.metadata.name}")


@app.command()
def crds(
    check: Annotated[bool, typer.Option("--check", help="Exit 1 if the CRD files differ from the models.")] = False,
    root: Annotated[Path, typer.Option(help="Repository root that holds crds/.")] = Path("."),
) -> None:
    """Write crds/*.yaml (and the Helm chart's copy) from the API models."""
    from lmforge.api.crd import stale_crds, write_crds

    if check:
        stale = stale_crds(root)
        if stale:
            for path in stale:
                typer.echo(f"stale: {path}", err=True)
            typer.echo("Run `lmforge crds` and commit the result.", err=True)
            raise typer.Exit(exitcodes.PROBLEMS_FOUND)
        typer.echo("CRDs are up to date.")
        return
    for path in write_crds(root):
        typer.echo(f"wrote {path}")


def _load_training_job(path: Path):  # noqa: ANN202 - TrainingJob, imported lazily
    from lmforge.api.loading import load_one

    manifest, problems = load_one(path, kind="TrainingJob")
    if problems:
        print_problems(problems)
        raise typer.Exit(exitcodes.INVALID_SPEC)
    return manifest


@app.command()
def run(
    manifest: Annotated[Path, typer.Argument(help="TrainingJob manifest.")],
    processes: Annotated[
        int | None,
        typer.Option("--processes", "-n", min=1, help="Processes on this node (default: spec.resources)."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Torch threads per process on CPU (default: cores / processes).")
    ] = None,
) -> None:
    """Train a TrainingJob here (locally, or as the entry point of each pod)."""
    from lmforge.trainer.launch import launch

    job = _load_training_job(manifest)
    outcome = launch(job, processes=processes, threads=threads)
    if outcome.message:
        typer.echo(typer.style("error: ", fg="red", bold=True) + outcome.message, err=True)
    if outcome.result:
        _print_summary(outcome.result)
    raise typer.Exit(outcome.exit_code)


def _print_summary(result: dict) -> None:
    import math

    typer.echo("")
    typer.echo(typer.style("Training finished", bold=True))
    lines = [
        (
            "steps",
            f"{result['steps']}" + (f" (resumed at {result['resumed_from']})" if result.get("resumed_from") else ""),
        ),
        ("tokens", f"{result['tokens']:,}"),
        ("final loss", f"{result['final_loss']:.4f}" if result.get("final_loss") is not None else "-"),
        (
            "eval loss",
            f"{result['final_eval_loss']:.4f} (perplexity {math.exp(min(result['final_eval_loss'], 50)):.1f})"
            if result.get("final_eval_loss") is not None
            else "-",
        ),
        ("tokens/s", f"{result['tokens_per_second']:,.0f}"),
        ("peak lr", f"{result['peak_lr']:.3g}" if result.get("peak_lr") else "-"),
        ("time", f"{result['seconds']:.0f}s"),
        ("model", result.get("model_uri") or "-"),
    ]
    for name, value in lines:
        typer.echo(f"  {name:<11}{value}")


@app.command()
def prepare(manifest: Annotated[Path, typer.Argument(help="TrainingJob manifest; its spec.data is prepared.")]) -> None:
    """Prepare spec.data (clean, deduplicate, filter, tokenize) into shards and print the data report."""
    from lmforge.data.preparation import prepare_data

    job = _load_training_job(manifest)
    try:
        prepared = prepare_data(job.spec, log=typer.echo)
    except (ValueError, FileNotFoundError, PermissionError) as exc:  # empty result, missing source, no access
        typer.echo(typer.style("error: ", fg="red", bold=True) + str(exc), err=True)
        raise typer.Exit(exitcodes.INVALID_SPEC) from None
    except Exception as exc:  # storage outage or an unexpected fault: the operator retries
        typer.echo(typer.style("error: ", fg="red", bold=True) + f"{type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(exitcodes.RETRYABLE) from None
    state = "reused" if prepared.reused else "prepared"
    typer.echo(
        f"{state}: {prepared.prepared_uri} (train {prepared.train_tokens:,} / val {prepared.val_tokens:,} tokens)"
    )


@app.command(name="lr-find")
def lr_find(
    manifest: Annotated[Path, typer.Argument(help="TrainingJob manifest.")],
    processes: Annotated[int | None, typer.Option("--processes", "-n", min=1, help="Processes on this node.")] = None,
) -> None:
    """Run the LR range test of spec.training.lrFinder; save lr_finder.png and print the suggestion."""
    from lmforge.trainer.launch import launch

    job = _load_training_job(manifest)
    outcome = launch(job, processes=processes, mode="lr-find")
    if outcome.message:
        typer.echo(typer.style("error: ", fg="red", bold=True) + outcome.message, err=True)
    if outcome.result:
        typer.echo(f"suggested learning rate: {outcome.result['suggestion']:.3g}")
    raise typer.Exit(outcome.exit_code)


def _model_dir(model: str, s3_endpoint: str | None) -> Path:
    """A local directory for a model given as a path, file:// or s3:// URI."""
    if "://" not in model:
        return Path(model)
    from lmforge.api.common import S3Settings
    from lmforge.trainer.outputs import materialize

    settings = S3Settings(endpoint=s3_endpoint, addressing_style="path" if s3_endpoint else "auto")
    return materialize(model, settings)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Exported model: directory, file:// or s3:// URI.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate.")] = 100,
    beams: Annotated[int, typer.Option(min=1, help="Beam search with this many beams (1: no beam search).")] = 1,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 means greedy.")] = 0.0,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    s3_endpoint: Annotated[str | None, typer.Option(help="S3 endpoint for s3:// models.")] = None,
) -> None:
    """Continue a prompt with greedy decoding, beam search or sampling (KV-cached)."""
    from lmforge.compress.modelio import load_any
    from lmforge.trainer.generate import generate as run_generation

    directory = _model_dir(model, s3_endpoint)
    if not (directory / contract.MODEL_META).exists():
        typer.echo(f"error: {model} is not an exported lmforge model (no {contract.MODEL_META})", err=True)
        raise typer.Exit(exitcodes.PROBLEMS_FOUND)
    net, tokenizer, _ = load_any(directory)
    ids = tokenizer.encode(prompt).ids
    eot = tokenizer.token_to_id("<|endoftext|>")
    if not ids:
        ids = [eot]
    room = net.config.context_length - len(ids)
    if room < 1:
        typer.echo(
            f"error: the prompt has {len(ids)} tokens; the model's context is {net.config.context_length}", err=True
        )
        raise typer.Exit(exitcodes.USAGE)
    if beams > 1:
        strategy = "beam"
    elif temperature > 0 or top_k is not None or top_p is not None:
        strategy = "sample"
    else:
        strategy = "greedy"
    new = run_generation(
        net,
        ids,
        min(max_new_tokens, room),
        strategy=strategy,
        temperature=temperature or 1.0,
        top_k=top_k,
        top_p=top_p,
        beams=beams,
        eos_token_id=eot,
        seed=seed,
    )
    typer.echo(prompt + tokenizer.decode(new))


@app.command()
def report(
    output: Annotated[str, typer.Argument(help="Run output: directory, file:// or s3:// URI.")],
    s3_endpoint: Annotated[str | None, typer.Option(help="S3 endpoint for s3:// outputs.")] = None,
) -> None:
    """Plot loss, eval loss, lr and tokens/s from metrics.jsonl and print a summary."""
    from lmforge.trainer.report import plot_curves, read_metrics, summarize

    if "://" in output and not output.startswith("file://"):
        directory = _model_dir(output, s3_endpoint)
    else:
        from lmforge.data.storage import local_path

        directory = local_path(output) if output.startswith("file://") else Path(output)
    metrics = directory / contract.METRICS_JSONL
    if not metrics.exists():
        typer.echo(f"error: no {contract.METRICS_JSONL} in {output}; pass the output.uri of a run", err=True)
        raise typer.Exit(exitcodes.PROBLEMS_FOUND)
    records = read_metrics(metrics)
    typer.echo(summarize(records))
    plot_curves(records, directory / "report.png")
    typer.echo(f"curves: {directory / 'report.png'}")


@app.command()
def compress(
    manifest: Annotated[Path, typer.Argument(help="CompressionJob manifest.")],
    threads: Annotated[int | None, typer.Option(min=1, help="Torch threads on CPU (default: torch's).")] = None,
) -> None:
    """Run a CompressionJob here: prune / distill / quantize, evaluate each step, apply the quality gate."""
    from lmforge.compress.commands import compress_command

    raise typer.Exit(compress_command(manifest, threads=threads, echo=typer.echo))


@app.command(name="eval")
def evaluate(
    model: Annotated[str, typer.Argument(help="Exported model (quantized too): directory, file:// or s3:// URI.")],
    data: Annotated[
        str | None, typer.Option(help="Prepared data (a run's OUTPUT/data); default MODEL/../data.")
    ] = None,
    batches: Annotated[int, typer.Option(min=1, help="Validation micro-batches (8 sequences each).")] = 20,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated latency batch sizes.")] = "1,8",
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="Also time torch.compile.")] = False,
    profile: Annotated[
        bool, typer.Option("--profile/--no-profile", help="torch.profiler time per module type.")
    ] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the measurements as JSON.")] = None,
    s3_endpoint: Annotated[str | None, typer.Option(help="S3 endpoint for s3:// models and data.")] = None,
) -> None:
    """Perplexity, parameters, size, prefill/decode speed at each batch size, and where the time goes."""
    from lmforge.api.common import S3Settings
    from lmforge.compress.commands import eval_command

    try:
        sizes = [int(s) for s in batch_sizes.split(",") if s.strip()]
    except ValueError:
        typer.echo(f"error: --batch-sizes {batch_sizes!r} is not a comma-separated list of integers", err=True)
        raise typer.Exit(exitcodes.USAGE) from None
    s3 = S3Settings(endpoint=s3_endpoint, addressing_style="path" if s3_endpoint else "auto")
    code = eval_command(
        _model_dir(model, s3_endpoint),
        data=data,
        batches=batches,
        batch_sizes=sizes,
        compile=compile,
        profile=profile,
        json_path=json_out,
        s3=s3,
        echo=typer.echo,
    )
    raise typer.Exit(code)


@app.command()
def operator(
    namespace: Annotated[
        list[str] | None,
        typer.Option(
            "--namespace", "-n", help="Namespace to watch (repeatable); default LMFORGE_NAMESPACES, else all."
        ),
    ] = None,
    metrics_port: Annotated[int, typer.Option(help="Port of the operator's /metrics; 0 disables.")] = 9402,
    liveness: Annotated[
        str, typer.Option(help="Kopf liveness endpoint URL; empty disables.")
    ] = "http://0.0.0.0:8080/healthz",
    peering: Annotated[
        bool,
        typer.Option("--peering/--standalone", help="Kopf peering for several replicas (needs the KopfPeering CRD)."),
    ] = False,
    poll_interval: Annotated[float, typer.Option(help="Seconds between supervision steps of a job.")] = 5.0,
    progress_interval: Annotated[float, typer.Option(help="Seconds between reads of rank 0's metrics.")] = 10.0,
) -> None:
    """Run the Kopf operator that turns TrainingJobs and CompressionJobs into DeepSpeed pods."""
    from lmforge.operator.main import run_operator

    run_operator(
        namespace or [],
        metrics_port,
        liveness or None,
        peering=peering,
        poll_interval=poll_interval,
        progress_interval=progress_interval,
    )


@app.command(name="exit-codes")
def exit_codes() -> None:
    """List the exit codes lmforge commands use (the operator relies on them)."""
    for code, text in exitcodes.DESCRIPTIONS.items():
        typer.echo(f"{code:>3}  {text}")


if __name__ == "__main__":  # pragma: no cover
    app()
