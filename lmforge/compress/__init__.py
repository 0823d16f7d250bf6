"""Compression: structured/unstructured pruning, distillation, quantization, evaluation, the pipeline.

=================  =========================================================================
``evaluate``       perplexity, parameters, size on disk, prefill/decode speed, profile
``prune``          structured pruning (layers, FFN channels, heads) and magnitude pruning
``distill``        student from teacher layers, trained on KL(T-softened) + cross-entropy
``quantize``       torchao int8 / int4 weight quantization (torch.ao fallback for int8)
``modelio``        save and load compressed models (quantized ones included)
``pipeline``       ``compress(CompressionJob)``: the ordered steps, results table, quality gate
=================  =========================================================================
"""
