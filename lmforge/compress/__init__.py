"""Compression: structured/unstructured pruning, distillation, quantization, evaluation, the pipeline.

=================  =========================================================================
``evaluate``       perplexity, parameters, size on disk, prefill/decode speed, profile
``prune``          structured pruning (layers, FFN channels, heads) and magnitude pruning
``distill``        student from teacher layers, trained on KL(T-softened) + cross-entropy
``train``          the recovery/distillation loop: the trainer's DeepSpeed engine on one process
``quantize``       torchao int8 / int4 weight quantization (torch.ao fallback for int8)
``modelio``        save and load compressed models (quantized ones included)
``data``           the job's data prepared with the source model's tokenizer, and its readers
``gate``           the quality gate: a pure function from the numbers to a verdict and message
``results``        the results rows, written as results.json, results.md and results.png
``pipeline``       ``compress(CompressionJob)``: the ordered steps, one function per step kind
``commands``       the work behind `lmforge compress` and `lmforge eval` (exit codes)
=================  =========================================================================
"""
