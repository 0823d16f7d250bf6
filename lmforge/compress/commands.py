"""The work behind `lmforge compress` and `lmforge eval`, kept out of cli.py so it stays thin.

Both return the process exit code and print to stdout/stderr through the ``echo`` they are given.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge import exitcodes
from lmforge.contract import DATA_DIR, MODEL_META

Echo = Callable[..., None]


def compress_command(manifest_path: Path, *, threads: int | None, echo: Echo) -> int:
    """Run a CompressionJob manifest: 0 ok, 78 invalid spec, QUALITY_GATE_EXIT gate failed, 75 otherwise."""
    from lmforge.api.loading import load_one
    from lmforge.compress.pipeline import QUALITY_GATE_EXIT, CompressionSpecError, QualityGateFailed, compress

    manifest, problems = load_one(manifest_path, kind="CompressionJob")
    if problems:
        for problem in problems:
            echo(f"error: {problem}", err=True)
        return exitcodes.INVALID_SPEC
    try:
        outcome = compress(manifest, log=lambda text: echo(text), threads=threads)  # type: ignore[arg-type]
    except QualityGateFailed as failed:
        echo(f"error: {failed}", err=True)
        echo(f"results: {failed.outcome.report_uri}", err=True)
        return QUALITY_GATE_EXIT
    except (CompressionSpecError, ValueError) as exc:
        echo(f"error: {exc}", err=True)
        return exitcodes.INVALID_SPEC
    except FileNotFoundError as exc:
        echo(f"error: {exc}", err=True)
        return exitcodes.INVALID_SPEC
    except Exception:  # noqa: BLE001 - storage outages and the like: worth a retry
        echo(traceback.format_exc(), err=True)
        return exitcodes.RETRYABLE
    echo(f"model: {outcome.model_uri}\nresults: {outcome.report_uri}")
    return exitcodes.OK


def eval_command(
    model_dir: Path,
    *,
    data: str | None,
    batches: int,
    batch_sizes: list[int],
    compile: bool,
    profile: bool,
    json_path: Path | None,
    s3: Any,
    echo: Echo,
) -> int:
    """Evaluate an exported (possibly quantized) model; ``data`` is a prepared-data URI (``OUTPUT/data``).

    Without ``data``, ``<model>/../data`` is used when it holds a prepared val split; otherwise only
    size and speed are measured.
    """
    from lmforge.compress.evaluate import evaluate_dir, format_evaluation

    if not (model_dir / MODEL_META).exists():
        echo(f"error: {model_dir} is not an exported lmforge model (no {MODEL_META})", err=True)
        return exitcodes.PROBLEMS_FOUND
    prepared = data
    if prepared is None and (model_dir.parent / DATA_DIR / "val" / "index.json").exists():
        prepared = f"file://{(model_dir.parent / DATA_DIR).absolute()}"
    if prepared is None:
        echo("note: no --data and no prepared data next to the model: perplexity is not measured", err=True)
    elif "://" not in prepared:
        prepared = f"file://{Path(prepared).absolute()}"
    from lmforge.compress.data import reader as _reader  # noqa: F401 - fail early on a bad install

    result = evaluate_dir(
        str(model_dir),
        prepared_uri=prepared,
        s3=s3,
        batches=batches,
        batch_sizes=batch_sizes,
        compile=compile,
        profile=profile,
    )
    echo(format_evaluation(str(model_dir), result))
    if json_path is not None:
        json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        echo(f"json: {json_path}")
    return exitcodes.OK
