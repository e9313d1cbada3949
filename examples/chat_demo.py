"""
A local web chat with an OmniFusion model: upload images (and sound clips, for a model with sound), ask about them
over several turns, watch the reply stream in, stop it, and change the generation settings.

    pip install ".[demo]"
    python examples/quickstart.py                   # makes the default model, quickstart-output/omnifusion
    python examples/chat_demo.py [--model PATH] [--port 7860] [--dtype auto|float32|bfloat16]

then open http://127.0.0.1:7860 in a browser. `--model` is any saved or converted OmniFusion folder or Hub repo id.
The server listens on 127.0.0.1 only; `--host 0.0.0.0` opens it to the network (the app has no login).

Replies are streamed with one beam (greedy at temperature 0, sampling above it): transformers' streamers refuse
beam search, so a converted release's `num_beams=3` is not used here (the page says so). The app's logic
(history to chat messages, settings, streaming) is `modeling_omnifusion.chat_demo`. More: docs/usage.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from modeling_omnifusion.hub_omnifusion import is_hub_repo_id
from modeling_omnifusion.inference import DTYPE_CHOICES, resolve_dtype

DEFAULT_MODEL = os.path.join("quickstart-output", "omnifusion")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"An OmniFusion folder or Hub repo id (default: {DEFAULT_MODEL}, made by examples/quickstart.py).",
    )
    parser.add_argument("--port", type=int, default=7860, help="The port to listen on (default: 7860).")
    parser.add_argument("--host", default="127.0.0.1", help="The address to listen on (default: 127.0.0.1).")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="Weights dtype; auto: bfloat16 on a GPU or a CPU with native bfloat16, float32 otherwise.",
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    if args.model == DEFAULT_MODEL and not os.path.isdir(args.model):
        parser.error(
            f"no model folder at {DEFAULT_MODEL}: make it with `python examples/quickstart.py` (about 2 minutes on "
            "CPU), or name a saved OmniFusion folder or Hub repo id with --model"
        )
    if not os.path.isdir(args.model) and not is_hub_repo_id(args.model):
        parser.error(f"--model {args.model!r} is neither a folder nor a Hub repo id")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        sys.exit('the chat demo needs gradio: pip install ".[demo]"')
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from modeling_omnifusion.chat_demo import build_app

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(
        args.model, trust_remote_code=True, dtype=resolve_dtype(args.dtype, device)
    ).to(device)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    app = build_app(model.eval(), processor, model_name=args.model)
    print(f"serving {args.model} ({model.dtype}) at http://{args.host}:{args.port}", flush=True)
    app.launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
