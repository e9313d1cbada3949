"""
Evaluation of vision-language models (installed with the `[eval]` extra; not remote code, never imported by it).

- `visdial`: the Visual Dialog v1.0 driver behind `omnifusion-evaluate-visdial` (`main(argv)`).
- `visdial_scoring`: candidate ranking by log-likelihood on transformers models, with KV-cache reuse.
- `visdial_vllm`: the same scores on a vLLM engine (imported only by `--backend vllm`).
- `metrics`: the VisDial `evaluate` metric (`metrics.VISDIAL_METRIC_DIR`).
"""
