"""Train or fine-tune an AttentionModel on conversation pairs: AdamW, warmup + cosine decay, resumable checkpoints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_tokenizer
from .data import (IGNORE_INDEX, SMALL_TALK_WEIGHT, ChatDataset, CorpusError, Pair, augment_pairs, deduplicate,
                   load_chatterbot_pairs, load_pairs, small_talk_pairs, split_held_out)
from .model import PRESETS, AttentionModel, ModelConfig
from .tokenizer import Tokenizer

STATE_FILE = "trainer_state.pt"
RESULT_FILE = "train_result.json"
CHECKPOINT_FILES = ("config.json", "model.safetensors")

# What ensure_default_model trains: the `small` preset with these overrides, 4.5 minutes on 2 idle Xeon cores.
# Fewer steps give vaguer replies; more steps or less regularization memorize the corpus (held-out loss climbs).
# The time limit bounds a busy machine: the learning-rate schedule then follows the clock.
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_MODEL_OVERRIDES = dict(dropout_rate=0.2)
DEFAULT_TRAINING = dict(steps=1200, batch_size=32, weight_decay=0.3, time_limit_s=450.0, held_out_fraction=0.05,
                        augment_variants=2, max_history_turns=2)


@dataclass
class TrainResult:
    out_dir: str
    steps: int
    held_out_loss: float
    held_out_perplexity: float
    train_loss: float
    tokens_per_s: float
    elapsed_s: float
    num_parameters: int
    evals: list[dict] = field(default_factory=list)


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def has_checkpoint(directory) -> bool:
    return all((Path(directory) / name).exists() for name in CHECKPOINT_FILES)


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of similar-length examples (less padding), the same for the same (seed, epoch)."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class ThreadChooser:
    """Chooses torch's CPU thread count while training. All cores are fastest on an idle machine, but when
    other processes compete for the cores one thread can be several times faster. Each `period` steps it
    times `trial` steps with each choice (per token, as batches differ in length) and keeps the faster."""

    def __init__(self, choices: list[int], period: int = 100, trial: int = 4):
        self.choices, self.period, self.trial = choices, period, trial
        self.best = self.choices[0]
        self.timings: dict[int, list[float]] = {}

    def threads_for(self, step: int) -> int:
        phase = step % self.period
        if len(self.choices) > 1 and phase < self.trial * len(self.choices):
            return self.choices[phase // self.trial]
        return self.best

    def record(self, step: int, threads: int, seconds_per_token: float) -> None:
        phase = step % self.period
        if phase == 0:
            self.timings = {}
        if len(self.choices) > 1 and phase < self.trial * len(self.choices):
            self.timings.setdefault(threads, []).append(seconds_per_token)
            if phase == self.trial * len(self.choices) - 1:
                self.best = min(self.timings, key=lambda t: sorted(self.timings[t])[len(self.timings[t]) // 2])


def learning_rate_at(progress: float, peak: float, warmup: float, min_ratio: float = 0.1) -> float:
    """Linear warmup over the first `warmup` fraction of training, then cosine decay to min_ratio * peak."""
    if progress < warmup:
        return peak * (progress + 1e-3) / (warmup + 1e-3)
    decay = min(1.0, (progress - warmup) / max(1e-8, 1.0 - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * decay)))


def batch_loss(model: AttentionModel, batch: dict, device) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the tokens with a target, and how many there were. Logits are computed for
    those positions only (the output layer is a quarter of the small model's compute)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    if "src_ids" in batch:
        memory = model.encode(batch["src_ids"], batch["src_padding_mask"])
        hidden = model.decode(batch["decoder_input_ids"], memory=memory,
                              memory_padding_mask=batch["src_padding_mask"])
    else:
        hidden = model.decode(batch["input_ids"])
    targets = batch["targets"]
    keep = targets != IGNORE_INDEX
    loss = F.cross_entropy(model.logits(hidden[keep]).float(), targets[keep])
    return loss, int(keep.sum())


@torch.no_grad()
def evaluate(model: AttentionModel, dataset: ChatDataset, batch_size: int, device) -> float:
    """Token-weighted mean loss of the dataset's target tokens."""
    if len(dataset) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    lengths = dataset.lengths()
    order = sorted(range(len(dataset)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        batch = dataset.collate([dataset[i] for i in order[start:start + batch_size]])
        loss, n = batch_loss(model, batch, device)
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / max(count, 1)


def make_optimizer(model: AttentionModel, learning_rate: float, weight_decay: float, device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.98), eps=1e-8,
                             fused=device.type == "cuda")


def save_checkpoint(model, tokenizer, optimizer, out_dir: Path, step: int, total_steps: int, elapsed_s: float,
                    evals: list[dict]) -> None:
    model.save_pretrained(out_dir, tokenizer=tokenizer)
    state = {"step": step, "total_steps": total_steps, "elapsed_s": elapsed_s, "evals": evals,
             "optimizer": optimizer.state_dict()}
    tmp = out_dir / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out_dir / STATE_FILE)


def train(
    config: ModelConfig | None,
    pairs: list[Pair],
    tokenizer: Tokenizer | None,
    out_dir,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 32,
    learning_rate: float | None = None,
    seed: int = 0,
    held_out_fraction: float = 0.1,
    resume: bool = True,
    from_dir=None,
    progress: bool = True,
    time_limit_s: float | None = None,
    warmup: float = 0.05,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    eval_every: int | None = None,
    save_every: int | None = None,
    max_history_turns: int = 2,
    augment_variants: int = 0,
    num_threads: int | None = None,
    device=None,
) -> TrainResult:
    """Train `config` (or fine-tune the checkpoint in `from_dir`, keeping its tokenizer) on `pairs`.

    Length is `steps`, or `epochs` over the training split (default 10 epochs); `time_limit_s` stops early,
    and the learning-rate schedule follows whichever of steps or time runs out first. With `resume`, a
    checkpoint with trainer state in out_dir continues from its saved step.
    """
    out_dir = Path(out_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = ThreadChooser([num_threads] if num_threads else sorted({available_cpus(), 1}, reverse=True))
    threads_before = torch.get_num_threads()
    seed_everything(seed)

    state = None
    if resume and (out_dir / STATE_FILE).exists() and has_checkpoint(out_dir):
        model = AttentionModel.from_pretrained(out_dir)
        tokenizer = Tokenizer.from_file(out_dir / "tokenizer.json")
        state = torch.load(out_dir / STATE_FILE, map_location="cpu", weights_only=True)
    elif from_dir is not None:
        model = AttentionModel.from_pretrained(from_dir)
        tokenizer = load_tokenizer(from_dir) or tokenizer
        if tokenizer is None:
            raise ValueError(f"{from_dir} has no tokenizer.json and no tokenizer was given")
        if config is not None:  # the checkpoint fixes the architecture; keep the caller's training settings
            model.config.dropout_rate, model.config.learning_rate = config.dropout_rate, config.learning_rate
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = config.dropout_rate
    else:
        if config is None or tokenizer is None:
            raise ValueError("train() needs a config and a tokenizer unless it resumes or starts from_dir")
        model = AttentionModel(config)
    config = model.config
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}")
    model.to(device=device, dtype=torch.float32).train()  # fp32 weights; autocast handles bf16 on GPUs

    train_pairs, held_pairs = split_held_out(pairs, held_out_fraction, seed)
    if augment_variants:
        train_pairs = augment_pairs(train_pairs, augment_variants, seed)
    dataset_args = dict(max_length=config.sequence_length - 1, max_history_turns=max_history_turns,
                        encoder_decoder=not config.decoder_only)
    train_set = ChatDataset(train_pairs, tokenizer, **dataset_args)
    held_set = ChatDataset(held_pairs, tokenizer, **dataset_args)
    if len(train_set) == 0:
        raise ValueError("no training examples: the corpus is empty or every reply was truncated away")
    lengths = train_set.lengths()
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    if steps or epochs or not state:
        total_steps = steps or max(1, round((epochs or 10) * steps_per_epoch))
    else:
        total_steps = state["total_steps"]
    eval_every = eval_every or max(1, total_steps // 5)
    save_every = save_every or eval_every

    peak_lr = learning_rate or config.learning_rate
    optimizer = make_optimizer(model, peak_lr, weight_decay, device)
    step, prior_elapsed, evals = 0, 0.0, []
    if state:
        optimizer.load_state_dict(state["optimizer"])
        step, prior_elapsed, evals = state["step"], state["elapsed_s"], state["evals"]
        torch.manual_seed(seed + step)
    out_dir.mkdir(parents=True, exist_ok=True)

    if step == 0 and len(held_set):
        evals.append({"step": 0, "held_out_loss": evaluate(model, held_set, batch_size, device)})
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    started, tokens_seen, smooth_loss, loss_value = time.perf_counter(), 0, None, float("nan")
    elapsed, batches_epoch, batches = prior_elapsed, None, []
    while step < total_steps:
        epoch, index = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches_epoch, batches = epoch, epoch_batches(lengths, batch_size, seed, epoch)
        batch = train_set.collate([train_set[i] for i in batches[index]])
        elapsed = prior_elapsed + time.perf_counter() - started
        progress_fraction = step / total_steps
        if time_limit_s:
            progress_fraction = max(progress_fraction, elapsed / time_limit_s)
        lr = learning_rate_at(progress_fraction, peak_lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if device.type == "cpu":
            torch.set_num_threads(threads.threads_for(step))
        step_started = time.perf_counter()
        with autocast:
            loss, _ = batch_loss(model, batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        loss_value = loss.item()
        batch_tokens = sum(lengths[i] for i in batches[index])
        threads.record(step, torch.get_num_threads(), (time.perf_counter() - step_started) / max(1, batch_tokens))
        tokens_seen += batch_tokens
        step += 1
        smooth_loss = loss_value if smooth_loss is None else 0.95 * smooth_loss + 0.05 * loss_value
        run_time = time.perf_counter() - started
        elapsed = prior_elapsed + run_time
        out_of_time = time_limit_s is not None and elapsed >= time_limit_s
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{smooth_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_seen / run_time:.0f}")
        if step % eval_every == 0 and step < total_steps and not out_of_time and len(held_set):
            evals.append({"step": step, "held_out_loss": evaluate(model, held_set, batch_size, device)})
            if bar is not None:
                bar.write(f"step {step}: held-out loss {evals[-1]['held_out_loss']:.3f}")
        if step % save_every == 0 and step < total_steps and not out_of_time:
            save_checkpoint(model, tokenizer, optimizer, out_dir, step, total_steps, elapsed, evals)
        if out_of_time:
            break
    if bar is not None:
        bar.close()
    torch.set_num_threads(threads_before)

    held_loss = evaluate(model, held_set, batch_size, device)
    evals.append({"step": step, "held_out_loss": held_loss})
    save_checkpoint(model, tokenizer, optimizer, out_dir, step, step, elapsed, evals)
    run_time = time.perf_counter() - started
    result = TrainResult(
        out_dir=str(out_dir),
        steps=step,
        held_out_loss=held_loss,
        held_out_perplexity=math.exp(held_loss) if held_loss == held_loss else float("nan"),
        train_loss=smooth_loss if smooth_loss is not None else loss_value,
        tokens_per_s=tokens_seen / run_time if run_time > 0 else 0.0,
        elapsed_s=elapsed,
        num_parameters=model.num_parameters(),
        evals=evals,
    )
    (out_dir / RESULT_FILE).write_text(json.dumps(dataclasses.asdict(result), indent=2))
    return result


def default_training_pairs() -> list[Pair]:
    """The ChatterBot English corpus without exact repeats, plus Pioneer's own small talk (weighted)."""
    return deduplicate(load_chatterbot_pairs("english")) + small_talk_pairs() * SMALL_TALK_WEIGHT


def small_config(vocab_size: int, **overrides) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, **{**PRESETS["small"], **overrides})


def train_tokenizer_for(pairs: list[Pair], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    return Tokenizer.train((text for p in pairs for text in (*p.history, p.prompt, p.reply)), vocab_size)


def ensure_default_model(data_dir, progress: bool = True) -> Path:
    """Path of data_dir/models/default, training the `small` preset on the ChatterBot corpus first if needed."""
    path = Path(data_dir) / "models" / "default"
    if has_checkpoint(path):
        return path
    print(f"No model in {path}: training the small preset on the ChatterBot corpus (about 5 minutes on 2 CPU "
          f"cores)...", flush=True)
    partial = path.with_name("default.partial")  # resumable; becomes `default` only when complete
    pairs = default_training_pairs()
    tokenizer = Tokenizer.from_file(partial / "tokenizer.json") if (partial / "tokenizer.json").exists() \
        else train_tokenizer_for(pairs)
    config = small_config(tokenizer.vocab_size, pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id,
                          eos_token_id=tokenizer.eos_id, **DEFAULT_MODEL_OVERRIDES)
    train(config, pairs, tokenizer, partial, progress=progress, **DEFAULT_TRAINING)
    (partial / STATE_FILE).unlink(missing_ok=True)
    try:
        partial.rename(path)
    except OSError:  # another process finished first
        if not has_checkpoint(path):
            raise
    return path


def main(argv=None) -> None:
    d = DEFAULT_TRAINING
    parser = argparse.ArgumentParser(description="Train or fine-tune a Pioneer model on conversation pairs.")
    parser.add_argument("--data", help="JSONL/YAML file or directory of pairs (default: ChatterBot + small talk)")
    parser.add_argument("--out", required=True, help="checkpoint directory (resumed if it has trainer state)")
    parser.add_argument("--from", dest="from_dir", help="fine-tune this checkpoint, keeping its tokenizer")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--steps", type=int, help=f"default {d['steps']} unless --epochs is given")
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--batch-size", type=int, default=d["batch_size"])
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    parser.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out", type=float, default=d["held_out_fraction"])
    parser.add_argument("--time-limit", type=float, help="seconds")
    parser.add_argument("--augment", type=int, default=d["augment_variants"], help="prompt variants per pair")
    parser.add_argument("--no-resume", action="store_true")
    args = parser.parse_args(argv)

    try:
        pairs = load_pairs(args.data) if args.data else default_training_pairs()
    except CorpusError as exc:
        parser.exit(2, f"error: {exc}\n")
    config = tokenizer = None
    resuming = not args.no_resume and (Path(args.out) / STATE_FILE).exists()
    if not args.from_dir and not resuming:
        tokenizer = train_tokenizer_for(pairs, args.vocab_size)
        overrides = {**PRESETS[args.preset], **(DEFAULT_MODEL_OVERRIDES if args.preset == "small" else {})}
        config = ModelConfig(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                             bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, **overrides)
    steps = args.steps or (None if args.epochs else d["steps"])
    result = train(config, pairs, tokenizer, args.out, steps=steps, epochs=args.epochs, batch_size=args.batch_size,
                   learning_rate=args.lr, seed=args.seed, held_out_fraction=args.held_out,
                   resume=not args.no_resume, from_dir=args.from_dir, time_limit_s=args.time_limit,
                   weight_decay=args.weight_decay, augment_variants=args.augment,
                   max_history_turns=d["max_history_turns"])
    held_out = (f"held-out loss {result.held_out_loss:.3f}, perplexity {result.held_out_perplexity:.1f}"
                if result.held_out_loss == result.held_out_loss else "no held-out pairs")
    print(f"{result.steps} steps in {result.elapsed_s:.0f}s ({result.tokens_per_s:.0f} tokens/s): {held_out}; "
          f"saved to {result.out_dir}")


if __name__ == "__main__":
    main()
