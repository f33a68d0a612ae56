"""The learning-rate range test: `python -m soup.train train.lr_finder=true ...`.

Smith, "Cyclical Learning Rates for Training Neural Networks" (arXiv 1506.01186, sec. 3.3): train
for a few steps while the lr grows exponentially from train.lr_finder_min_lr to
train.lr_finder_max_lr, and watch the loss. Step i of n uses
    lr_i = min_lr * (max_lr / min_lr) ** (i / (n - 1))
(each optim.lr_groups group keeps its ratio to optim.lr). The loss of each step is smoothed with
an exponential moving average (beta 0.98, bias-corrected, as fastai's finder does), and the sweep
stops early once the smoothed loss passes 4x its best or stops being finite: past that point the
lr only diverges.

Suggested lr: where the smoothed loss falls fastest against log(lr) (the steepest negative slope,
central differences), the usual reading of the curve; lr_at_min_loss / 10 is reported beside it.

Only the run's config and the sweep are real; nothing else is kept: the run directory gets
lr_finder.json (every step's lr and loss, both suggestions) and lr_finder.png, and no checkpoint,
final/ or run.json, so the sweep cannot be mistaken for (or resumed as) a trained run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


from soup.data.sampler import ResumableBatchSampler
from soup.distributed import unwrap
from soup.loop import autocast_context, clipped_optimizer_step, to_device
from soup.optim import build_optimizer

SMOOTHING = 0.98
DIVERGED = 4.0


def lr_schedule(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """The sweep's lrs: `steps` values from min_lr to max_lr, evenly spaced in log(lr)."""
    return [min_lr * (max_lr / min_lr) ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: list[float]) -> list[float]:
    """Bias-corrected exponential moving average of the losses (beta SMOOTHING)."""
    average, smoothed = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed.append(average / (1 - SMOOTHING**i))
    return smoothed


def suggest(lrs: list[float], smoothed: list[float]) -> dict:
    """{steepest: lr of the steepest fall of loss vs log lr, min_over_10: lr at the lowest loss / 10}."""
    if len(lrs) < 3:
        raise ValueError("the sweep needs at least 3 points to read a slope")
    logs = [math.log(lr) for lr in lrs]
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, len(lrs) - 1)]
    steepest = 1 + min(range(len(slopes)), key=slopes.__getitem__)
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    return {"steepest": lrs[steepest], "min_over_10": lrs[lowest] / 10}


def run_lr_finder(cfg, model, task, train_examples: list, collate, run_dir: Path, device, sampler=None) -> float:
    """Run the sweep, write lr_finder.json and lr_finder.png into run_dir; return the suggested lr."""
    train_cfg = cfg.train
    policy = unwrap(model)
    optimizer = build_optimizer(task.optimized_module(policy), cfg.optim, cfg.peft)
    ratios = [group["lr"] / cfg.optim.lr for group in optimizer.param_groups]
    if sampler is None:
        sampler = ResumableBatchSampler(len(train_examples), train_cfg.micro_batch_size, cfg.seed)
    lrs = lr_schedule(train_cfg.lr_finder_min_lr, train_cfg.lr_finder_max_lr, train_cfg.lr_finder_steps)
    tried, losses, stop_reason = [], [], "reached lr_finder_max_lr"
    model.train()
    for step, lr in enumerate(lrs):
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        rows = [[train_examples[i] for i in sampler.next_batch()] for _ in range(train_cfg.grad_accum_steps)]
        batches = task.prepare_step(rows, collate, policy, step)
        units = sum(task.units(b) for b in batches)
        step_loss = 0.0
        for batch in batches:
            with autocast_context(train_cfg.precision, device):
                out = task.forward(model, to_device(batch, device))
            (out.loss_sum / max(units, 1)).backward()
            step_loss += float(out.loss_sum.detach())
        clipped_optimizer_step(optimizer, None, train_cfg.max_grad_norm)
        optimizer.zero_grad(set_to_none=True)
        loss = step_loss / max(units, 1)
        tried.append(lr)
        losses.append(loss)
        if not math.isfinite(loss):
            stop_reason = f"the loss became {loss} at lr {lr:.3g}"
            tried.pop(), losses.pop()
            break
        smoothed = smooth(losses)
        if step > 0 and smoothed[-1] > DIVERGED * min(smoothed):
            stop_reason = f"the smoothed loss passed {DIVERGED:g}x its best at lr {lr:.3g}"
            break
    smoothed = smooth(losses)
    suggestion = suggest(tried, smoothed)
    record = {"suggested_lr": suggestion["steepest"], "lr_at_min_loss_over_10": suggestion["min_over_10"],
              "stop_reason": stop_reason, "steps": len(tried), "lrs": tried, "losses": losses, "smoothed": smoothed,
              "settings": {"min_lr": train_cfg.lr_finder_min_lr, "max_lr": train_cfg.lr_finder_max_lr,
                           "steps": train_cfg.lr_finder_steps, "smoothing": SMOOTHING}}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "lr_finder.json").write_text(json.dumps(record, indent=2))
    _plot(tried, losses, smoothed, suggestion, run_dir / "lr_finder.png")
    print(f"[soup] lr finder: {len(tried)} steps from {tried[0]:.3g} to {tried[-1]:.3g} ({stop_reason}); "
          f"suggested optim.lr={suggestion['steepest']:.3g} (steepest fall of the loss; lowest loss / 10: "
          f"{suggestion['min_over_10']:.3g}); curve in {run_dir / 'lr_finder.png'}")
    return suggestion["steepest"]


def _plot(lrs, losses, smoothed, suggestion, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses, color="0.75", label="loss")
    ax.plot(lrs, smoothed, label="smoothed")
    ax.axvline(suggestion["steepest"], color="C3", linestyle="--", label=f"suggested {suggestion['steepest']:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
