"""
A warm start for sound's stage 1: the audio adapter aligned to the LM's own token embeddings by CTC.

Stage 1 trains the audio adapter through the frozen LM's next-token loss. From a random adapter that signal is weak:
the LM first has to find the words in positions that look like nothing it knows. `align_audio_adapter` gives the
adapter a start in which the words are already there: each pooled encoder position of a clip is scored against the
LM's input embedding of every token of the training transcripts (a learned temperature over the negative squared
distance) and against one extra learned "blank" vector, and the adapter is trained with CTC on the transcript's
tokens. Positions that hold a word move next to that word's embedding; the others move to the blank, which is
dropped afterwards. Only the adapter is updated; the encoder, the LM and every marker stay as they are.

The encoder is frozen, so each clip is encoded once (`audio_positions`) and the alignment costs only the adapter's
forward and backward: seconds to a minute on a CPU, against the seconds per step of training through the LM. Stage 1
(and stage 2) then continue from the aligned adapter as usual.

    positions = audio_positions(model, processor, waveforms)
    losses = align_audio_adapter(model, processor.tokenizer, positions, transcripts, steps=600)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from modeling_omnifusion.processing.audio_inputs_omnifusion import extract_audio_features


@torch.inference_mode()
def audio_positions(model, processor, waveforms: list[np.ndarray], batch_size: int = 4) -> list[torch.Tensor]:
    """
    Each clip's pooled encoder positions before the audio adapter, `[positions, audio width]` float32, as many as
    the model feeds the LM for that clip: the frozen audio tower runs once per clip, `batch_size` windows at a time.
    `waveforms` are mono float arrays at the feature extractor's sampling rate.
    """
    inner = _inner_model(model)
    if getattr(inner, "audio_tower", None) is None:
        raise ValueError("The model has no audio encoder (config.audio_config is None): nothing to align.")
    feature_extractor = processor.feature_extractor
    device = next(inner.audio_tower.parameters()).device
    positions = []
    for start in range(0, len(waveforms), batch_size):
        features = extract_audio_features(feature_extractor, list(waveforms[start : start + batch_size]))
        pooled, real, _ = inner.get_audio_positions(
            torch.from_numpy(features["input_features"]).to(device),
            torch.from_numpy(features["input_features_mask"]).to(device),
        )
        positions += [row[keep].float().cpu() for row, keep in zip(pooled, real)]
    return positions


class EmbeddingDistanceHead(nn.Module):
    """Scores of adapter outputs against fixed token embeddings and one learned blank (index 0): the negative squared
    distance over a learned temperature, so a position scores high for a token when it lies next to its embedding."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.register_buffer("embeddings", embeddings.detach().float().clone())
        self.blank = nn.Parameter(torch.zeros(embeddings.shape[1]))
        spread = embeddings.float().norm(dim=-1).mean().item() ** 2
        self.log_temperature = nn.Parameter(torch.tensor(math.log(max(spread, 1e-6) / 4)))

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        table = torch.cat([self.blank[None], self.embeddings])
        distances = (outputs * outputs).sum(-1, keepdim=True) - 2 * outputs @ table.T + (table * table).sum(-1)
        return -distances / self.log_temperature.exp()


@dataclass
class Alignment:
    """What `align_audio_adapter` returns: the CTC loss of every step, and the head it trained (its learned blank
    and the transcripts' token ids, `vocabulary`, in the order of the head's columns after the blank), with which
    `transcribe` reads the aligned adapter's outputs back as text without the LM: a diagnostic of how much of a
    clip the adapter alone gets right."""

    losses: list[float]
    head: EmbeddingDistanceHead
    vocabulary: list[int]

    @torch.no_grad()
    def transcribe(self, model, tokenizer, positions: list[torch.Tensor]) -> list[str]:
        """Each clip's greedy CTC readout: the best column at every position of the adapter's output, repeats
        merged, blanks dropped, the tokens decoded."""
        adapter = _audio_adapter(model)
        parameter = next(adapter.parameters())
        was_training = adapter.training
        adapter.eval()
        texts = []
        for clip in positions:
            outputs = adapter(clip[None].to(device=parameter.device, dtype=parameter.dtype)).float()
            columns = self.head.to(parameter.device)(outputs)[0].argmax(-1).tolist()
            previous = [0] + columns[:-1]  # a column repeated from the position before is the same token
            kept = [column for column, before in zip(columns, previous) if column and column != before]
            texts.append(tokenizer.decode([self.vocabulary[column - 1] for column in kept]).strip())
        adapter.train(was_training)
        return texts


def align_audio_adapter(
    model,
    tokenizer,
    positions: list[torch.Tensor],
    transcripts: list[str],
    steps: int = 600,
    batch_size: int = 16,
    learning_rate: float = 2e-3,
    warmup_steps: int = 20,
    seed: int = 0,
    log_every: int = 0,
    input_dropout: float = 0.0,
) -> Alignment:
    """
    Train `model`'s audio adapter with CTC so that each clip's adapter outputs spell its transcript in the LM's own
    token embeddings (module docstring). `positions[i]` (from `audio_positions`) is clip i, `transcripts[i]` what it
    says, tokenized as the LM writes it. AdamW at `learning_rate` with `warmup_steps` of linear warm-up and a cosine
    decay over `steps`, `batch_size` clips drawn at random each step (seeded). `input_dropout` zeroes that share of
    the encoder's values the adapter reads (scaled as `nn.Dropout` does) at each step: the adapter then cannot lean on
    a few features of the training voices (meant for a voice it never heard; `Alignment.transcribe` measures it).
    Returns the `Alignment`: every step's loss and the trained head.

    A `ValueError` names the clip when the lists differ in length, a transcript has no tokens, or a clip has fewer
    positions than its transcript has tokens (CTC could not place them).
    """
    if len(positions) != len(transcripts):
        raise ValueError(f"positions has {len(positions)} clips but transcripts has {len(transcripts)}")
    if not positions:
        raise ValueError("align_audio_adapter needs at least one clip")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    if not 0.0 <= input_dropout < 1.0:
        raise ValueError(f"input_dropout must be in [0, 1), got {input_dropout}")
    adapter = _audio_adapter(model)
    targets = []
    for index, (clip, text) in enumerate(zip(positions, transcripts)):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"transcript {index} ({text!r}) has no tokens")
        if len(ids) > len(clip):
            raise ValueError(
                f"clip {index} has {len(clip)} audio positions, fewer than the {len(ids)} tokens of its transcript "
                f"{text!r}: CTC cannot place them (a clip cut short, or the wrong transcript)"
            )
        targets.append(ids)
    vocabulary = sorted({token for ids in targets for token in ids})
    column = {token: index + 1 for index, token in enumerate(vocabulary)}  # 0 is the blank
    embeddings = model.get_input_embeddings().weight
    parameter = next(adapter.parameters())
    head = EmbeddingDistanceHead(embeddings[vocabulary]).to(parameter.device)
    trainable = list(adapter.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / max(1, warmup_steps)) * 0.5 * (1 + math.cos(math.pi * step / steps)),
    )
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)  # the dropout masks (CPU), so a seed repeats a run exactly
    was_training = adapter.training
    adapter.train()
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            batch = rng.sample(range(len(positions)), min(batch_size, len(positions)))
            inputs = nn.utils.rnn.pad_sequence([positions[i] for i in batch], batch_first=True)
            if input_dropout:
                keep = torch.empty_like(inputs).bernoulli_(1.0 - input_dropout, generator=generator)
                inputs = inputs * keep / (1.0 - input_dropout)
            outputs = adapter(inputs.to(device=parameter.device, dtype=parameter.dtype)).float()
            log_probs = head(outputs).log_softmax(-1).transpose(0, 1)
            labels = [torch.tensor([column[token] for token in targets[i]]) for i in batch]
            loss = ctc(
                log_probs,
                torch.cat(labels).to(parameter.device),
                torch.tensor([len(positions[i]) for i in batch]),
                torch.tensor([len(ids) for ids in labels]),
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(f"alignment step {step + 1}/{steps}: CTC loss {losses[-1]:.3f}", flush=True)
    adapter.train(was_training)
    for weight in adapter.parameters():
        weight.grad = None
    head.requires_grad_(False)
    return Alignment(losses, head, vocabulary)


def _inner_model(model):
    """The `OmniFusionModel` of an `OmniFusionForCausalLM` (or the model itself)."""
    return model.model if hasattr(model, "model") and hasattr(model.model, "get_audio_positions") else model


def _audio_adapter(model) -> nn.Module:
    adapter = getattr(_inner_model(model), "audio_adapter", None)
    if adapter is None:
        raise ValueError("The model has no audio adapter (config.audio_config is None): nothing to align.")
    return adapter


__all__ = ["Alignment", "EmbeddingDistanceHead", "align_audio_adapter", "audio_positions"]
