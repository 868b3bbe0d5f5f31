"""The training recipe runner: one stage from a `Recipe`, on accelerate, top to bottom.

The same code runs on the CPU, one GPU, several processes with DDP (`torchrun` or `accelerate
launch`), and DeepSpeed ZeRO-2 from the accelerate config files in `recipes/accelerate/`:

    medplib train --recipe recipes/stage2_vl_expert.yaml train.steps=200
    torchrun --standalone --nproc_per_node 2 -m medplib.cli train --recipe ...      # gloo DDP on CPUs
    accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml -m medplib.cli train --recipe ...

A run folder holds `recipe.yaml` (the resolved recipe), `metrics.jsonl` (one line per optimizer
step), `tb/` (TensorBoard), `checkpoints/step_*` and, at the end, `model/` (LoRA merged into the
base weights), which `MedPLIB.from_pretrained` and the next stage load.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml
from torch.utils.data import DataLoader

from medplib.api import MedPLIB
from medplib.model.moe import moe_layers
from medplib.training.build import build_model
from medplib.training.checkpoint import (latest_checkpoint, load_checkpoint, load_engine_checkpoint, save_checkpoint,
                                         save_engine_checkpoint)
from medplib.training.data import (GROUP_NAMES, EncodeCollate, StreamSampler, StreamView, build_dataset,
                                   route_targets, token_groups)
from medplib.training.fit import warmup_linear
from medplib.training.recipe import Recipe, RecipeError
from medplib.training.trainable import merge_lora

PARTS = ("loss", "ce", "bce", "dice", "focal", "iou", "aux")
MODEL_DIR = "model"


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(batch)
    for key in ("input_ids", "labels", "attention_mask", "vision_pixels", "pixel_values"):
        out[key] = batch[key].to(device)
    out["region_masks"] = [[m.to(device) for m in ms] for ms in batch["region_masks"]]
    out["target_masks"] = [[m.to(device) for m in ms] for ms in batch["target_masks"]]
    if "example_pixels" in batch:
        out["example_pixels"] = [p.to(device) for p in batch["example_pixels"]]
    return out


def _routing_shares(layers: list[Any], reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, list[float]]:
    """Share of router selections per expert, per token group, over all MoE layers since the last call."""
    n_groups, n_exp = len(GROUP_NAMES), layers[0].num_experts
    counts = torch.zeros(n_groups, n_exp, dtype=torch.float64)
    for layer in layers:
        c = layer.group_counts.to("cpu", torch.float64)
        counts[: c.shape[0]] += c
        layer.reset_stats()
    counts = reduce(counts)
    shares = {}
    for g, name in enumerate(GROUP_NAMES):
        total = float(counts[g].sum())
        if total > 0:
            shares[name] = [round(float(v) / total, 4) for v in counts[g]]
    return shares


@dataclass
class TrainResult:
    folder: Path  # <output_dir>/model
    model: MedPLIB  # the trained model, LoRA merged (on every process; under DeepSpeed / FSDP on the main one)
    history: list[dict[str, Any]]  # this run's metrics rows (steps after a resume point only)


@contextmanager
def _full_parameters(accelerator: Any) -> Iterator[None]:
    """Build models with whole parameters under DeepSpeed ZeRO-3 too. With a ZeRO-3 config active,
    transformers constructs every model inside `deepspeed.zero.Init`, whose parameters are empty
    shards, so a stage's weights cannot be loaded into them; `accelerator.prepare` partitions the
    whole model instead."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or getattr(plugin, "dschf", None) is None:
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(plugin.dschf)


def train(recipe: Recipe, *, log: Callable[[str], None] = print) -> TrainResult:
    """Run one stage."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    t, ck = recipe.train, recipe.checkpoint
    run = Path(recipe.output_dir)

    # 1. Processes, precision, accumulation: the global batch is fixed, accumulation fills it.
    # Without a GPU, torchrun's environment means gloo DDP on the CPU (accelerate needs cpu=True for
    # it), except under `accelerate launch` with a DeepSpeed config, which cpu=True would switch off.
    cpu = not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
    world = PartialState(cpu=cpu).num_processes
    if t.global_batch % (t.micro_batch * world):
        raise RecipeError(f"train.global_batch ({t.global_batch}) must be a multiple of train.micro_batch "
                          f"({t.micro_batch}) x processes ({world})")
    accum = t.global_batch // (t.micro_batch * world)
    try:
        # find_unused_parameters: a batch without [SEG] leaves the mask decoder out of the graph.
        accelerator = Accelerator(cpu=cpu, mixed_precision="no" if t.mixed_precision == "fp32" else t.mixed_precision,
                                  gradient_accumulation_steps=accum,
                                  kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    except ValueError as exc:  # e.g. fp16 without a GPU, or a bad accelerate config file
        raise RecipeError(f"cannot set up accelerate (train.mixed_precision={t.mixed_precision}): {exc}") from None
    # Sharded engines write their own checkpoints (see training/checkpoint.py).
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    rank, main = accelerator.process_index, accelerator.is_main_process
    barrier = accelerator.wait_for_everyone

    # 2. Model: preset or earlier stage, upcycling, LoRA, trainable groups, loss weights.
    with _full_parameters(accelerator):
        m = build_model(recipe)
    if t.gradient_checkpointing:
        m.model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_train = sum(p.numel() for p in m.model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in m.model.parameters())

    # 3. Data: a fixed stream of samples; each process reads its share of every global batch.
    dataset = build_dataset(recipe.data, t.seed)
    steps = t.steps or max(1, math.ceil(t.epochs * len(dataset) / t.global_batch))  # type: ignore[arg-type]

    # 4. Optimizer and schedule: AdamW, linear warmup then linear decay to 0 (published).
    params = [p for p in m.model.parameters() if p.requires_grad]
    o = recipe.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.betas[0], o.betas[1]), weight_decay=o.weight_decay)
    warm = math.ceil(o.warmup_ratio * steps) if o.warmup_ratio > 0 else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_linear(s, steps, warm))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # DeepSpeed batches and clips from its own config
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds.update(train_micro_batch_size_per_gpu=t.micro_batch, gradient_accumulation_steps=accum,
                  gradient_clipping=o.grad_clip)
    model, opt = accelerator.prepare(m.model, opt)  # the scheduler is stepped by hand, once per optimizer step
    accelerator.register_for_checkpointing(sched)  # saved with the engine's state under DeepSpeed / FSDP

    # 5. Resume from the newest complete checkpoint: weights, optimizer, schedule, RNG, data position.
    start = 0
    found = latest_checkpoint(run) if ck.resume else None
    if found is not None and sharded:
        start = load_engine_checkpoint(found, accelerator, world=world)
    elif found is not None:
        start = load_checkpoint(found, accelerator.unwrap_model(model), opt, sched, rank=rank, world=world)
    metrics_path = run / "metrics.jsonl"
    if main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
        # Keep the history up to the checkpoint: steps logged after it are redone.
        old = metrics_path.read_text(encoding="utf-8").splitlines() if metrics_path.is_file() and start else []
        keep = [ln for ln in old if ln.strip() and json.loads(ln)["step"] <= start]
        metrics_path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        log(f"[{recipe.name}] {n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M parameters train; {len(dataset)} samples; "  # type: ignore[arg-type]
            f"{steps} steps of {t.global_batch} ({world} process(es) x {t.micro_batch} x {accum} accumulation, "
            f"{accelerator.distributed_type.value}, {t.mixed_precision})"
            + (f"; resuming at step {start} from {found}" if found is not None else ""))
    sampler = StreamSampler(global_batch=t.global_batch, micro_batch=t.micro_batch, rank=rank, world=world,
                            start_step=start, total_steps=steps)
    loader = DataLoader(StreamView(dataset, t.seed, recipe.data.augment), batch_size=t.micro_batch, sampler=sampler,
                        num_workers=recipe.data.num_workers,
                        collate_fn=EncodeCollate(m.processor),
                        generator=torch.Generator().manual_seed(t.seed))  # own RNG: iter() must not draw from the restored one

    # 6. The loop.
    writer = None
    if main and recipe.log.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run / "tb"))
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, disable=not (main and recipe.log.progress), desc=recipe.name, unit="step")
    moe = moe_layers(m.model.llm)
    route_coef = m.config.moe.router_task_coef if moe else 0.0  # 0: no route targets to compute
    batches = iter(loader)
    history: list[dict[str, Any]] = []
    model.train()
    for step in range(start, steps):
        began = time.perf_counter()
        sums = torch.zeros(len(PARTS))
        n_samples = 0
        for _ in range(accum):
            batch = next(batches)
            with accelerator.accumulate(model):
                if batch is None:  # every sample of this micro-batch was bad: a zero loss keeps DDP in step
                    loss = sum((p * 0).sum() for p in params)
                    accelerator.backward(loss)
                else:
                    batch = _to_device(batch, accelerator.device)
                    if moe:
                        groups = token_groups(batch).to(accelerator.device)
                        targets = route_targets(batch, groups, m.model.ids.image) if route_coef else None
                        for layer in moe:
                            layer.set_token_groups(groups)
                            layer.set_route_targets(targets)
                    out = model(**batch)
                    accelerator.backward(out.loss)
                    sums += torch.tensor([float(out.loss.detach())] + [float(out.parts[k].detach()) for k in PARTS[1:]])
                    n_samples += batch["input_ids"].shape[0]
                if accelerator.sync_gradients and o.grad_clip > 0:
                    accelerator.clip_grad_norm_(params, o.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
        sched.step()
        # Mean over micro-batches and processes: equals a one-process run with the same global batch.
        parts = accelerator.reduce(sums.to(accelerator.device) / accum, reduction="mean").cpu()
        seen = int(accelerator.reduce(torch.tensor(n_samples, device=accelerator.device), reduction="sum"))
        row: dict[str, Any] = {"step": step + 1, **{k: float(v) for k, v in zip(PARTS, parts)},
                               "lr": sched.get_last_lr()[0], "samples_per_s": seen / (time.perf_counter() - began)}
        if moe and (step + 1) % recipe.log.every == 0:
            row["routing"] = _routing_shares(moe, lambda x: accelerator.reduce(x.to(accelerator.device), "sum").cpu())
        history.append(row)
        if main:
            with metrics_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            if writer is not None:
                for k in (*PARTS, "lr", "samples_per_s"):
                    writer.add_scalar(f"train/{k}", row[k], step + 1)
                for g, shares in row.get("routing", {}).items():
                    for e, share in enumerate(shares):
                        writer.add_scalar(f"routing/{g}/expert{e}", share, step + 1)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "ce", "dice", "bce")}, refresh=False)
            bar.update(1)
        if not (ck.every and (step + 1) % ck.every == 0 and step + 1 < steps):
            continue
        if sharded:
            save_engine_checkpoint(run, step + 1, accelerator, world=world, keep_last=ck.keep_last)
        else:
            save_checkpoint(run, step + 1, accelerator.unwrap_model(model), opt, sched, rank=rank, world=world,
                            barrier=barrier, keep_last=ck.keep_last)
    bar.close()
    for layer in moe:
        layer.set_token_groups(None)
        layer.set_route_targets(None)
        layer.reset_stats()

    # 7. The stage's model: LoRA merged into the base weights, a folder that inference loads.
    barrier()
    folder = run / MODEL_DIR
    if sharded:
        # The engine holds the parameters in shards or flat buffers: gather a full state dict (ZeRO-3 and
        # FSDP to the main process) and load it into a freshly built model of the same structure.
        state = accelerator.get_state_dict(model)
        if main:
            with _full_parameters(accelerator):
                m = build_model(recipe)
            m.model.load_state_dict(state)
    merge_lora(m.model)
    m.model.eval()
    if main:
        if writer is not None:
            writer.close()
        tmp = run / (MODEL_DIR + ".tmp")  # complete or absent: the pipeline skips stages whose folder exists
        shutil.rmtree(tmp, ignore_errors=True)
        m.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        log(f"[{recipe.name}] saved the model to {folder}")
    barrier()
    return TrainResult(folder, m, history)


def end_processes() -> None:
    """Call once when a command is done with training. gloo can abort at exit unless every process
    passes a barrier before the process group is destroyed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_recipe(path: str | os.PathLike[str], overrides: list[str], log: Callable[[str], None] = print) -> TrainResult:
    """`medplib train`: load a recipe, apply overrides, train one stage."""
    from medplib.training.recipe import load_recipe

    try:
        return train(load_recipe(path, overrides), log=log)
    finally:
        end_processes()
