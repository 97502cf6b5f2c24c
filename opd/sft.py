"""Supervised training of the bundled models on worked solutions: `opd make-models` runs it.

The teacher trains until it is near-perfect on the correct solutions; the student learns from a tutor
with one systematic habit (opd/tutor.py), so on-policy distillation has a gap to close that the
teacher's scores point at.
Both are seeded and run on CPU, in bf16 autocast where the CPU computes bf16 natively (AVX512-BF16 or
AMX: about 2x faster than fp32 there) and in fp32 elsewhere (an AVX2-only CPU emulates bf16, and a
step took 12 times as long as in fp32 on one).

    opd make-models            # both, into models/
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from opd.evaluate import evaluate
from opd.models import count_parameters, tiny_config
from opd.padding import pad_id, right_pad
from opd.tutor import tutor_answered, tutored
from shared.task import Problem, problems


@dataclass
class SFTConfig:
    kind: str  # "teacher" or "student": picks the architecture
    steps: int  # planned steps: the cosine schedule decays over these
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    eval_every: int = 250
    eval_n: int = 200  # dev problems from the train split (the eval split stays unseen)
    stop_above: float | None = None  # stop once dev accuracy reaches this
    # Learn from the tutor with this habit (opd/tutor.py); None: from the correct solutions.
    slip_max: int | None = None
    seed: int = 0


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak at `cfg.steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sft_batch(
    tokenizer: PreTrainedTokenizerBase, batch: list[Problem]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_B_T, labels_B_T): <bos> prompt target <eos>, right-padded; labels only on target + <eos>."""
    prompts = tokenizer([p.prompt for p in batch])["input_ids"]
    targets = tokenizer([p.target for p in batch], add_special_tokens=False)["input_ids"]
    rows = [(pr, tg + [tokenizer.eos_token_id]) for pr, tg in zip(prompts, targets)]
    ids = right_pad([pr + tg for pr, tg in rows], pad_id(tokenizer))
    labels = right_pad([[-100] * len(pr) + tg for pr, tg in rows], -100)
    return ids, labels


def length_bucketed(data: list[Problem], batch_size: int, seed: int) -> list[list[Problem]]:
    """Batches of similar-length problems, in a seeded random order: less padding, same data."""
    rng = random.Random(seed)
    batches = []
    window = batch_size * 32
    for i in range(0, len(data), window):
        chunk = sorted(data[i : i + window], key=lambda p: len(p.target))
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def training_batches(cfg: SFTConfig) -> list[list[Problem]]:
    """The run's batches: train-split problems, with the tutor's solutions if `cfg.slip_max`."""
    data = problems("train", cfg.steps * cfg.batch_size, seed=cfg.seed)
    if cfg.slip_max is not None:
        data = tutored(data, cfg.slip_max)
    return length_bucketed(data, cfg.batch_size, cfg.seed)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast pays."""
    # Private helpers, but the only test torch offers; an older torch without them gets fp32.
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def sft_step(
    model: LlamaForCausalLM,
    optimizer: torch.optim.Optimizer,
    ids: torch.Tensor,
    labels: torch.Tensor,
    bf16: bool = False,
) -> float:
    """One cross-entropy update (in bf16 autocast if `bf16`) with the gradient norm clipped to 1;
    the loss."""
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=labels).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def train(cfg: SFTConfig, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> dict:
    """Train one model from scratch and save it (with the tokenizer) to `out_dir`; returns a report."""
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(
        tiny_config(
            cfg.kind,
            len(tokenizer),
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = training_batches(cfg)
    dev = problems("train", cfg.eval_n, seed=cfg.seed + 10_000)
    bf16 = cpu_has_native_bf16()
    start = time.perf_counter()
    dev_acc, step = None, 0  # None until the first evaluation
    bar = tqdm(range(cfg.steps), desc=f"sft {cfg.kind}", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = sft_step(model, optimizer, *sft_batch(tokenizer, batches[step]), bf16=bf16)
        bar.set_postfix(loss=f"{loss:.4f}", dev_acc="-" if dev_acc is None else f"{dev_acc:.3f}")
        if (step + 1) % cfg.eval_every == 0:
            model.eval()
            dev_acc = evaluate(model, tokenizer, dev, progress=False).accuracy
            bar.write(f"  step {step + 1}: loss {loss:.4f}, dev accuracy {dev_acc:.3f}")
            if cfg.stop_above is not None and dev_acc >= cfg.stop_above:
                break
    bar.close()
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report = {
        "kind": cfg.kind,
        "parameters": count_parameters(model),
        "steps": step + 1,
        "seconds": round(time.perf_counter() - start, 1),
        "precision": "bf16 autocast" if bf16 else "fp32",
        "dev_accuracy": dev_acc,
    }
    if cfg.slip_max is not None:  # how faithfully it learned the tutor's habit
        tutor = tutor_answered(dev, cfg.slip_max)
        report["dev_tutor_accuracy"] = evaluate(model, tokenizer, tutor, progress=False).accuracy
    return report
