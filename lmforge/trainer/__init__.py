"""The trainer: the model, its training loop on DeepSpeed, generation and export (needs the trainer extra).

Modules, one job each:

- :mod:`launch`: ``lmforge run`` / ``lr-find``: the world of processes on this node, its rendezvous, exit codes.
- :mod:`loop`: what each process runs: :class:`~lmforge.trainer.loop.Trainer` (components, then the loop), ``find_lr``.
- :mod:`world`: join the process group, check the world fits the spec, prepare the data (rank 0 first).
- :mod:`context`: where this process sits in the world (ranks, node), from the launcher's environment.
- :mod:`device`: this rank's device and how a reader's batch gets there.
- :mod:`collectives`: broadcast, mean and any across ranks, shared by the components.
- :mod:`model`: the decoder-only Transformer (Llama-style GPT) and its KV cache.
- :mod:`build`: the run's starting model: seeded random weights or model.initialModel's, checked.
- :mod:`engine`: every DeepSpeed call: process group, engine from the spec, full weights for export.
- :mod:`schedule`: the learning rate at each step (warm-up, then decay).
- :mod:`lr_finder`: the LR range test and its suggested peak learning rate.
- :mod:`readers`: the train reader (mixed with data.mix and replay) and the held-out reader.
- :mod:`evaluate`: the held-out loss, over the same batches each time.
- :mod:`logger`: Prometheus gauges, metrics.jsonl and the progress bar, one call per log interval.
- :mod:`metrics`: the Prometheus endpoint's families, the metrics.jsonl writer, GPU peak FLOP/s for MFU.
- :mod:`checkpoint`: atomic checkpoints on storage, and the run's resume and save.
- :mod:`outputs`: the output directory staged and published: model export, summary.json, RunResult.
- :mod:`continual`: what ``stage: continual`` adds: replay, EWC, the forgetting report and its gate.
- :mod:`ewc`: the elastic weight consolidation penalty and its Fisher estimate.
- :mod:`export`: exported models (Hugging Face layout) written and read back.
- :mod:`generate`: greedy, sampled and beam-search generation with the KV cache.
- :mod:`report`: ``lmforge report``: curves and a summary from metrics.jsonl.
"""
