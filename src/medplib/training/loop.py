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
from medplib.processing import Processor
from medplib.training.build import build_model
from medplib.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_engine_checkpoint,
    save_checkpoint,
    save_engine_checkpoint,
)
from medplib.training.data import (
    GROUP_NAMES,
    EncodeCollate,
    StreamSampler,
    StreamView,
    build_dataset,
    route_targets,
    token_groups,
)
from medplib.training.optim import build_optimizer
from medplib.training.recipe import LOSS_PARTS, Recipe, RecipeError
from medplib.training.trainable import merge_lora

PARTS = ("loss", *LOSS_PARTS)  # the columns of metrics.jsonl
MODEL_DIR = "model"


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


class StageRunner:
    """One stage of a recipe, in parts that can be run and tested on their own (torchtune's recipe
    class): `setup` (processes, model, data, optimizer, resume), `train_step` (one optimizer step,
    through `loss_step`), `save_checkpoint` and `finish` (the stage's model folder). `train` runs
    them in order."""

    def __init__(self, recipe: Recipe, *, log: Callable[[str], None] = print):
        self.recipe, self.log = recipe, log
        self.run = Path(recipe.output_dir)
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Processes and precision, the model, the data stream, the optimizer, and the resume point."""
        from accelerate import Accelerator, PartialState
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType

        recipe, t, ck = self.recipe, self.recipe.train, self.recipe.checkpoint

        # Processes, precision, accumulation: the global batch is fixed, accumulation fills it.
        # Without a GPU, torchrun's environment means gloo DDP on the CPU (accelerate needs cpu=True for
        # it), except under `accelerate launch` with a DeepSpeed config, which cpu=True would switch off.
        cpu = not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
        self.world = PartialState(cpu=cpu).num_processes
        if t.global_batch % (t.micro_batch * self.world):
            raise RecipeError(f"train.global_batch ({t.global_batch}) must be a multiple of train.micro_batch "
                              f"({t.micro_batch}) x processes ({self.world})")
        self.accum = t.global_batch // (t.micro_batch * self.world)
        try:
            # find_unused_parameters: a batch without [SEG] leaves the mask decoder out of the graph.
            self.accelerator = Accelerator(
                cpu=cpu, mixed_precision="no" if t.mixed_precision == "fp32" else t.mixed_precision,
                gradient_accumulation_steps=self.accum,
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        except ValueError as exc:  # e.g. fp16 without a GPU, or a bad accelerate config file
            raise RecipeError(f"cannot set up accelerate (train.mixed_precision={t.mixed_precision}): {exc}") from None
        acc = self.accelerator
        # Sharded engines write their own checkpoints (see training/checkpoint.py).
        self.sharded = acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        self.rank, self.main = acc.process_index, acc.is_main_process

        # Model: preset or earlier stage, upcycling, LoRA, trainable groups.
        with _full_parameters(acc):
            self.m = build_model(recipe)
        if t.gradient_checkpointing:
            self.m.model.enable_activation_checkpointing()
        n_train = sum(p.numel() for p in self.m.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.m.model.parameters())

        # Data: a fixed stream of samples; each process reads its share of every global batch.
        dataset = build_dataset(recipe.data, t.seed)
        self.steps = t.steps or max(1, math.ceil(t.epochs * len(dataset) / t.global_batch))  # type: ignore[arg-type]

        self.params = [p for p in self.m.model.parameters() if p.requires_grad]
        opt, self.sched = build_optimizer(self.params, recipe.optim, self.steps)
        if acc.distributed_type == DistributedType.DEEPSPEED:  # DeepSpeed batches and clips from its own config
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds.update(train_micro_batch_size_per_gpu=t.micro_batch, gradient_accumulation_steps=self.accum,
                      gradient_clipping=recipe.optim.grad_clip)
        self.model, self.opt = acc.prepare(self.m.model, opt)  # the scheduler is stepped by hand, once per step
        acc.register_for_checkpointing(self.sched)  # saved with the engine's state under DeepSpeed / FSDP

        # Resume from the newest complete checkpoint: weights, optimizer, schedule, RNG, data position.
        self.start = 0
        found = latest_checkpoint(self.run) if ck.resume else None
        if found is not None and self.sharded:
            self.start = load_engine_checkpoint(found, acc, world=self.world)
        elif found is not None:
            self.start = load_checkpoint(found, acc.unwrap_model(self.model), self.opt, self.sched,
                                         rank=self.rank, world=self.world)
        self.metrics_path = self.run / "metrics.jsonl"
        if self.main:
            self.run.mkdir(parents=True, exist_ok=True)
            (self.run / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
            # Keep the history up to the checkpoint: steps logged after it are redone.
            path = self.metrics_path
            old = path.read_text(encoding="utf-8").splitlines() if path.is_file() and self.start else []
            keep = [ln for ln in old if ln.strip() and json.loads(ln)["step"] <= self.start]
            path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
            self.log(f"[{recipe.name}] {n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M parameters train; "
                     f"{len(dataset)} samples; {self.steps} steps of {t.global_batch} ({self.world} process(es) x "  # type: ignore[arg-type]
                     f"{t.micro_batch} x {self.accum} accumulation, {acc.distributed_type.value}, {t.mixed_precision})"
                     + (f"; resuming at step {self.start} from {found}" if found is not None else ""))
        sampler = StreamSampler(global_batch=t.global_batch, micro_batch=t.micro_batch, rank=self.rank,
                                world=self.world, start_step=self.start, total_steps=self.steps)
        loader = DataLoader(StreamView(dataset, t.seed, recipe.data.augment), batch_size=t.micro_batch,
                            sampler=sampler, num_workers=recipe.data.num_workers,
                            collate_fn=EncodeCollate(self.m.processor),
                            # own RNG: iter() must not draw from the restored one
                            generator=torch.Generator().manual_seed(t.seed))
        self.batches = iter(loader)

        self.writer = None
        if self.main and recipe.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run / "tb"))
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.steps, initial=self.start, disable=not (self.main and recipe.log.progress),
                        desc=recipe.name, unit="step")
        self.moe = moe_layers(self.m.model.llm)
        self.model.train()

    # ------------------------------------------------------------------ steps
    def loss_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward one micro-batch (on the device) -> (the recipe-weighted loss, the unweighted parts).
        MoE models get the batch's token groups, and its route targets when the `route` loss is on."""
        if self.moe:
            groups = token_groups(batch).to(self.accelerator.device)
            batch = dict(batch, token_groups=groups)
            if self.recipe.loss.route:
                batch["route_targets"] = route_targets(batch, groups, self.m.model.ids.image,
                                                       self.recipe.upcycle.prefix_expert)
        out = self.model(**batch)
        return self.recipe.loss.combine(out.parts), out.parts

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step (`accum` micro-batches) -> its metrics row."""
        acc, o = self.accelerator, self.recipe.optim
        began = time.perf_counter()
        sums = torch.zeros(len(PARTS))
        n_samples = 0
        for _ in range(self.accum):
            batch = next(self.batches)
            with acc.accumulate(self.model):
                if batch is None:  # every sample of this micro-batch was bad: a zero loss keeps DDP in step
                    acc.backward(sum((p * 0).sum() for p in self.params))
                else:
                    loss, parts = self.loss_step(Processor.to_device(batch, acc.device))
                    acc.backward(loss)
                    sums += torch.tensor([float(loss.detach())] + [float(parts[k].detach()) for k in PARTS[1:]])
                    n_samples += batch["input_ids"].shape[0]
                if acc.sync_gradients and o.grad_clip > 0:
                    acc.clip_grad_norm_(self.params, o.grad_clip)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        # Mean over micro-batches and processes: equals a one-process run with the same global batch.
        parts_mean = acc.reduce(sums.to(acc.device) / self.accum, reduction="mean").cpu()
        seen = int(acc.reduce(torch.tensor(n_samples, device=acc.device), reduction="sum"))
        row: dict[str, Any] = {"step": step + 1, **{k: float(v) for k, v in zip(PARTS, parts_mean)},
                               "lr": self.sched.get_last_lr()[0], "samples_per_s": seen / (time.perf_counter() - began)}
        if self.moe and (step + 1) % self.recipe.log.every == 0:
            row["routing"] = _routing_shares(self.moe, lambda x: acc.reduce(x.to(acc.device), "sum").cpu())
        return row

    def record(self, row: dict[str, Any]) -> None:
        """Keep a step's row: history, metrics.jsonl, TensorBoard, the progress bar."""
        self.history.append(row)
        if not self.main:
            return
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k in (*PARTS, "lr", "samples_per_s"):
                self.writer.add_scalar(f"train/{k}", row[k], row["step"])
            for g, shares in row.get("routing", {}).items():
                for e, share in enumerate(shares):
                    self.writer.add_scalar(f"routing/{g}/expert{e}", share, row["step"])
        self.bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "ce", "dice", "bce")}, refresh=False)
        self.bar.update(1)

    # ------------------------------------------------------------------ checkpoints and the end
    def checkpoint_due(self, done: int) -> bool:
        """Whether a checkpoint follows `done` optimizer steps (the last step writes the model instead)."""
        every = self.recipe.checkpoint.every
        return bool(every) and done % every == 0 and done < self.steps

    def save_checkpoint(self, done: int) -> None:
        keep = self.recipe.checkpoint.keep_last
        if self.sharded:
            save_engine_checkpoint(self.run, done, self.accelerator, world=self.world, keep_last=keep)
        else:
            save_checkpoint(self.run, done, self.accelerator.unwrap_model(self.model), self.opt, self.sched,
                            rank=self.rank, world=self.world, barrier=self.accelerator.wait_for_everyone,
                            keep_last=keep)

    def finish(self) -> TrainResult:
        """The stage's model: LoRA merged into the base weights, a folder that inference loads."""
        acc = self.accelerator
        self.bar.close()
        for layer in self.moe:
            layer.reset_stats()
        acc.wait_for_everyone()
        folder = self.run / MODEL_DIR
        m = self.m
        if self.sharded:
            # The engine holds the parameters in shards or flat buffers: gather a full state dict (ZeRO-3 and
            # FSDP to the main process) and load it into a freshly built model of the same structure.
            state = acc.get_state_dict(self.model)
            if self.main:
                with _full_parameters(acc):
                    m = build_model(self.recipe)
                m.model.load_state_dict(state)
        merge_lora(m.model)
        m.model.eval()
        if self.main:
            if self.writer is not None:
                self.writer.close()
            tmp = self.run / (MODEL_DIR + ".tmp")  # complete or absent: the pipeline skips stages whose folder exists
            shutil.rmtree(tmp, ignore_errors=True)
            m.save_pretrained(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
            self.log(f"[{self.recipe.name}] saved the model to {folder}")
        acc.wait_for_everyone()
        return TrainResult(folder, m, self.history)


def train(recipe: Recipe, *, log: Callable[[str], None] = print) -> TrainResult:
    """Run one stage."""
    runner = StageRunner(recipe, log=log)
    runner.setup()
    for step in range(runner.start, runner.steps):
        runner.record(runner.train_step(step))
        if runner.checkpoint_due(step + 1):
            runner.save_checkpoint(step + 1)
    return runner.finish()


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
