"""The pretraining trainer, run by every rank under Lightning Fabric (:func:`mwm.train.pretrain.pretrain` launches it).

The trainer owns the run: its folder (lock, checkpoint, resume checks), the data and loader, the optimizer and the
schedule, gradient accumulation and clipping, metrics, checkpoints and the export. The method
(:mod:`mwm.train.methods`: SparK, MAE, …) owns the model and what one step computes. One micro-step:
``method.views(batch)`` (MIM: keep-masks drawn on the device from this rank's generator, seeded by (seed, rank),
so ranks mask differently) → ``method.training_step(views) -> (loss, logs)`` → ``loss / accumulate`` backward
(gradient sync skipped on all but the last micro-step of an optimizer step) → after ``accumulate`` micro-steps:
clip, optimizer step, scheduler step (per optimizer step), ``method.on_after_optimizer_step`` (EMA). Nothing in
the step reads a value back to the host: the loss, the method's named logs and the gradient norm are summed on
the device (:class:`RunningStats`) and all-reduced + read once every ``log_every`` optimizer steps (and at every
epoch end, so a checkpoint never holds half a logging interval).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..config import save_config
from ..errors import MWMError
from .checkpoint import (capture_rng, check_resumable, checkpoint_path, clean_orphans, load_checkpoint, restore_rng,
                         save_checkpoint)
from .config import PretrainConfig
from .data import CONTENT_SAMPLE, EpochSampler, PretrainDataset, collate, load_pretrain_data, micro_batches_per_epoch
from .export import check_encoder, export_encoder, timm_kwargs
from .metrics import COLUMNS, MetricsLogger, read_metrics
from .optim import build_optimizer, build_pretrain_scheduler, effective_batch

__all__ = ["run", "mask_seed", "Trainer", "RunningStats"]


def mask_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s generator for the method's draws (masks): distinct per rank, reproducible per
    (seed, rank)."""
    return int(np.random.SeedSequence([seed, rank, 0x6D61736B]).generate_state(1, np.uint64)[0] >> 1)


def _gather(fabric, obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if fabric.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * fabric.world_size
    dist.all_gather_object(out, obj)
    return out


def _default_workers(fabric, cfg: PretrainConfig) -> int:
    local = max(1, fabric.world_size // cfg.num_nodes)
    return min(4, max(0, (os.cpu_count() or 1) // local - 1))


class RunningStats:
    """Named statistics on the device: the method's logs summed per micro-step and the gradient norm per optimizer
    step; :meth:`read` averages them (over the interval, then over ranks) and reads them back in one host sync."""

    def __init__(self, device: torch.device):
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None
        self.grad_norm = torch.zeros((), device=device)
        self.micro = self.steps = 0

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        vec = torch.stack([v.float() for v in logs.values()])
        if self.sums is None:
            self.names, self.sums = list(logs), torch.zeros_like(vec)
        self.sums += vec
        self.micro += 1

    def read(self, fabric) -> dict[str, float]:
        """{name: interval mean} (and ``grad_norm``: mean per optimizer step); resets the interval."""
        vec = torch.cat([self.sums / self.micro, (self.grad_norm / max(1, self.steps)).view(1)])
        vals = fabric.all_reduce(vec, reduce_op="mean").tolist()  # the one host sync of a logging interval
        self.sums.zero_()
        self.grad_norm.zero_()
        self.micro = self.steps = 0
        return dict(zip([*self.names, "grad_norm"], vals))


def run(fabric, cfg: PretrainConfig, progress=None, stop_at_epoch: int | None = None, hook=None) -> dict | None:
    """Train on this rank. Returns the summary (a :class:`~mwm.train.summary.PretrainSummary` as a dict) on global
    rank 0, None elsewhere.

    progress(kind, done, total, info): called on rank 0 only; kinds "decode" (images), "start", "step" (every
    log interval, info = the metrics row), "epoch" (info: epoch, loss, seconds), "end" (info = summary).
    stop_at_epoch: stop after this many epochs in total (checkpointing first), as if the job were killed there.
    hook(event, info): called on every rank ("step": rank, step and the method's ``hook_info`` of the first batch,
    e.g. keep; "end": rank, model) — for tests.

    Global rank 0 holds ``OUT/.mwm.lock`` (:func:`mwm.io.lock_folder`) for the whole run, so a second run into the
    same folder fails naming this one. Only rank 0 locks: Fabric's subprocess launcher re-runs the command for
    the other local ranks and torchrun starts one process per rank, all of the same run; the outcome is
    broadcast so every rank stops together.
    """
    import contextlib

    from ..io import lock_folder

    with contextlib.ExitStack() as stack:
        err = None
        if fabric.is_global_zero:
            try:
                stack.enter_context(lock_folder(cfg.out, what="pretraining run"))
            except MWMError as e:
                err = str(e)
        if fabric.world_size > 1:
            err = fabric.broadcast(err, src=0)
        if err is not None:
            raise MWMError(err)
        return Trainer(fabric, cfg, progress, stop_at_epoch, hook).fit()


class Trainer:
    """One rank's run of :func:`run` (the folder lock held): :meth:`fit` = :meth:`setup`, :meth:`restore`,
    :meth:`wire`, then :meth:`train_epoch` per epoch with :meth:`log` / :meth:`save`, and :meth:`finish`."""

    def __init__(self, fabric, cfg: PretrainConfig, progress=None, stop_at_epoch: int | None = None, hook=None):
        self.fabric, self.cfg, self.progress, self.stop_at_epoch, self.hook = fabric, cfg, progress, stop_at_epoch, hook
        self.t0 = time.perf_counter()
        self.rank, self.world, self.zero = fabric.global_rank, fabric.world_size, fabric.is_global_zero
        self.out = Path(cfg.out)
        self.ckpt_file = checkpoint_path(self.out)
        self.ckpt: dict | None = None
        self.notes: list[str] = []
        self.start_epoch = self.step = self.epochs_done = 0
        self.epoch_seconds: list[float] = []
        self.recon_files: list[str] = []
        self.rows: list[dict] = []
        self.previews = None
        self.first_hook = True

    def emit(self, kind: str, done: int = 0, total=None, info=None) -> None:
        if self.zero and self.progress is not None:
            self.progress(kind, done, total, info or {})

    def fit(self) -> dict | None:
        self.setup()
        self.restore()
        self.wire()
        self.restore_streams()
        self.emit("start", self.step, self.total_steps, self._start_info())
        for epoch in range(self.start_epoch, self.cfg.epochs):
            self.train_epoch(epoch)
            if self.end_epoch(epoch):
                break
        return self.finish()

    # -- setup -----------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """The run folder, the method (+ --init), the data, then method, optimizer and schedule on the device."""
        self._open_folder()
        self._build_method()
        self._load_data()
        self._build_optimizer()

    def _open_folder(self) -> None:
        """A new run never overwrites a checkpoint; a resumed one must match it."""
        cfg, world = self.cfg, self.world
        if cfg.resume:
            self.ckpt = ckpt = load_checkpoint(self.ckpt_file)
            check_resumable(ckpt["config"], cfg, self.ckpt_file)
            if ckpt["world_size"] != world:
                raise MWMError(f"{self.ckpt_file} was written by {ckpt['world_size']} rank(s), this run has {world}: "
                               "the effective batch, learning rate and data shards would change. Resume on the same "
                               "number of devices × nodes, or start a new run with another --out")
        elif self.ckpt_file.exists():
            raise MWMError(f"{self.out} already holds a run ({self.ckpt_file}); pass --resume to continue it, or "
                           "choose another --out for a new run")
        self.fabric.barrier()  # every rank has looked before rank 0 writes anything
        if self.zero:
            removed = clean_orphans(self.out)  # safe: rank 0 holds the folder's lock, so no other writer is running
            if removed:
                self.notes.append(f"removed {len(removed)} temporary checkpoint file(s) a killed run left in "
                                  f"{self.ckpt_file.parent} ({', '.join(removed[:3])})")

    def _build_method(self) -> None:
        """The method first (a wrong arch or --init fails before a long decode), then the --init weights."""
        from lightning.fabric.utilities.seed import seed_everything

        from .methods import create_method

        cfg = self.cfg
        seed_everything(cfg.seed, verbose=False)
        self.method = create_method(cfg)
        self.init_info = self.ckpt.get("init") if self.ckpt is not None else None  # resuming: the checkpoint's wins
        if self.ckpt is None and cfg.init.lower() not in ("none", "random"):
            from ..weights import resolve_init

            self.init_info = self.method.apply_init(resolve_init(cfg.init, cfg.arch, self.method.timm_kwargs(),
                                                                 cfg.init_sha256))
        if self.zero:
            self.out.mkdir(parents=True, exist_ok=True)
            # resume is an action, not a property of the run: config.yaml must start this run afresh when given
            # alone; it pins the init weights by hash
            save_config(cfg.model_copy(update={"resume": False,
                                               "init_sha256": (self.init_info or {}).get("sha256")}),
                        self.out / "config.yaml")

    def _load_data(self) -> None:
        import warnings

        ckpt, file = self.ckpt, self.ckpt_file
        self.data = data = load_pretrain_data(self.cfg, progress=(lambda k: self.emit("decode", k)) if self.zero
                                              else None)
        if ckpt is not None and ckpt["data"] != data.fingerprint():
            raise MWMError(f"{file}: the data differ from the run's ({len(data)} images now); resume on the same "
                           "data, split and limit")
        self.content = data.content_fingerprint()
        if ckpt is not None and ckpt.get("data_content", self.content) != self.content:
            raise MWMError(f"{file}: the images have the run's ids but other pixels (a sample of {CONTENT_SAMPLE} "
                           "images spread over the data is hashed): the scans were replaced, re-exported or read "
                           "differently. Resume on the same data, or start a new run with another --out")
        self.run_warnings = list(data.warnings)
        if self.zero:
            for w in self.run_warnings:
                warnings.warn(w, stacklevel=1)

    def _build_optimizer(self) -> None:
        """The method on the device (EMA copy, sync-BN), the optimizer over its model and SparK's lr + wd schedule."""
        from .methods import MethodContext

        cfg, fabric, world, data = self.cfg, self.fabric, self.world, self.data
        self.generator = torch.Generator(device=fabric.device).manual_seed(mask_seed(cfg.seed, self.rank))
        sync_bn = world > 1 and cfg.sync_bn and fabric.device.type == "cuda"
        self.method.prepare(MethodContext(fabric.device, self.generator, data, sync_bn))
        self.optimizer, self.peak_lr, self.lr_rule = build_optimizer(self.method.model, cfg, world)
        self.micro = micro_batches_per_epoch(len(data), cfg.batch_size, cfg.accumulate, world)
        if self.micro == 0:
            raise MWMError(f"{cfg.data}: {len(data)} images (split '{data.split}') are fewer than one optimizer step "
                           f"of {effective_batch(cfg, world)} (batch {cfg.batch_size} × accumulate {cfg.accumulate} "
                           f"× {world} rank(s)); lower --batch-size or --accumulate")
        self.steps_per_epoch = self.micro // cfg.accumulate
        self.total_steps = self.steps_per_epoch * cfg.epochs
        warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        if self.zero and warmup_steps >= self.total_steps:
            import warnings

            warnings.warn(f"warmup ({warmup_steps} steps = {cfg.warmup_epochs:g} epochs) is as long as the whole run "
                          f"({self.total_steps} steps): the lr never reaches its peak; lower --warmup-epochs",
                          stacklevel=1)
        self.scheduler = build_pretrain_scheduler(self.optimizer, cfg, self.total_steps, warmup_steps)

    def restore(self) -> None:
        """A resumed run: the method's state, optimizer, schedule position, precision and the step counters, before
        Fabric wraps model and optimizer (loaded optimizer state follows the model's device)."""
        ckpt = self.ckpt
        if ckpt is None:
            return
        self.method.load_state_dict(ckpt, source=str(self.ckpt_file))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        # the schedule's length comes from this config (epochs may have changed), its position from the checkpoint
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.fabric.strategy.precision.load_state_dict(ckpt.get("precision") or {})
        self.start_epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.epochs_done = self.start_epoch

    def wire(self) -> None:
        """Fabric's wrapping, the loader, the metrics logger and (rank 0) the method's preview batch."""
        from torch.utils.data import DataLoader

        cfg, fabric, data = self.cfg, self.fabric, self.data
        self.wrapped, self.optimizer = fabric.setup(self.method.model, self.optimizer)
        self.method.wrap(self.wrapped)
        self.sampler = EpochSampler(len(data), self.micro * cfg.batch_size, self.world, self.rank, cfg.seed)
        workers = cfg.workers if cfg.workers is not None else _default_workers(fabric, cfg)
        dataset = PretrainDataset(data.images, data.boxes, cfg.augment, data.saliency)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=self.sampler, collate_fn=collate,
                            num_workers=workers, drop_last=True, pin_memory=fabric.device.type == "cuda",
                            persistent_workers=workers > 0)
        self.loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)  # sharding is EpochSampler's
        resumed = self.ckpt is not None
        self.logger = MetricsLogger(self.out, enabled=self.zero, resume_step=self.step if resumed else None)
        self.rows = read_metrics(self.logger.path) if (self.zero and resumed) else []
        self.last_row = self.rows[-1] if self.rows else {}
        if self.zero and cfg.recon_images > 0:
            self.previews = self.method.preview_set(data, cfg.recon_images)
        self.stats = RunningStats(fabric.device)
        self.epoch_loss = torch.zeros((), device=fabric.device)
        self.t_log = time.perf_counter()
        self.lr_used = self.scheduler.get_last_lr()[0]

    def restore_streams(self) -> None:
        """A resumed run: this rank's RNG streams and the method's per-rank state — last, so nothing above (model
        init, loader setup, previews) draws from the restored streams."""
        ckpt = self.ckpt
        if ckpt is None:
            return
        restore_rng(ckpt["rng"][self.rank], self.generator)
        keys = self.method.rank_state_dict().keys()
        self.method.load_rank_state_dict({k: ckpt[k][self.rank] for k in keys if ckpt.get(k) is not None})

    def _start_info(self) -> dict:
        data = self.data
        return {"lr": self.peak_lr, "lr_rule": self.lr_rule, "images": len(data), "world_size": self.world,
                "steps_per_epoch": self.steps_per_epoch, "start_epoch": self.start_epoch, "split": data.split,
                "roi_stats": data.roi_stats, "notes": self.notes, "saliency_stats": data.saliency_stats or None,
                "init": self.init_info if self.ckpt is None else None}

    # -- training --------------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> None:
        """One epoch of micro-steps, optimizer steps every ``accumulate``, a metrics row every ``log_every``."""
        cfg = self.cfg
        t = time.perf_counter()
        self.sampler.use_epoch(epoch)
        self.method.on_epoch_start(epoch)
        self.wrapped.train()
        self.epoch_loss.zero_()
        for i, batch in enumerate(self.loader):
            last_micro = (i + 1) % cfg.accumulate == 0
            self.micro_step(batch, last_micro)
            if not last_micro:
                continue
            self.optimizer_step()
            if self.step % cfg.log_every == 0:
                self.log(epoch)
        self.log(epoch)  # the epoch's tail, so checkpoints fall on whole logging intervals
        self.epochs_done = epoch + 1
        self.epoch_seconds.append(time.perf_counter() - t)
        mean_loss = float(self.fabric.all_reduce(self.epoch_loss / self.micro, reduce_op="mean"))
        self.emit("epoch", self.step, self.total_steps, {"epoch": self.epochs_done, "epochs": cfg.epochs,
                                                         "loss": mean_loss, "seconds": self.epoch_seconds[-1]})

    def micro_step(self, batch, last_micro: bool) -> None:
        views = self.method.views(batch)
        if self.hook is not None and self.first_hook:
            self.hook("step", {"rank": self.rank, "step": self.step, **self.method.hook_info(views)})
            self.first_hook = False
        with self.fabric.no_backward_sync(self.wrapped, enabled=not last_micro):
            loss, logs = self.method.training_step(views)
            self.fabric.backward(loss / self.cfg.accumulate)
        loss = loss.detach()
        self.stats.add({"loss": loss, **logs})
        self.epoch_loss += loss

    def optimizer_step(self) -> None:
        cfg = self.cfg
        if cfg.clip_grad is not None:
            # error_if_nonfinite=False: checking would read the norm back every step (a host sync)
            self.stats.grad_norm += self.fabric.clip_gradients(self.wrapped, self.optimizer, max_norm=cfg.clip_grad,
                                                               error_if_nonfinite=False)
        self.lr_used = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.stats.steps += 1
        self.method.on_after_optimizer_step(self.step)

    def log(self, epoch: int) -> None:
        """A metrics row from the interval's statistics (one host sync): metrics.csv, TensorBoard, progress."""
        if self.stats.micro == 0:
            return
        n_micro = self.stats.micro
        means = self.stats.read(self.fabric)
        now = time.perf_counter()
        row = dict.fromkeys(COLUMNS)
        row.update(self.method.log_row(means))
        row.update(step=self.step, epoch=epoch + 1, lr=self.lr_used,
                   grad_norm=means["grad_norm"] if self.cfg.clip_grad else None,
                   images_per_s=n_micro * self.cfg.batch_size * self.world / max(now - self.t_log, 1e-9),
                   elapsed_s=now - self.t0)
        if not math.isfinite(row["loss"]):
            raise MWMError(f"the loss became {row['loss']} at step {self.step}; lower --lr/--base-lr, keep "
                           "--clip-grad on, or use --precision bf16-mixed instead of 16-mixed")
        self.logger.log(row)
        self.rows.append(row)
        self.last_row = row
        self.emit("step", self.step, self.total_steps, row)
        self.t_log = now

    def end_epoch(self, epoch: int) -> bool:
        """Pictures and the checkpoint when due; True when the run stops here (``stop_at_epoch``)."""
        cfg, done = self.cfg, epoch + 1
        stopping = self.stop_at_epoch is not None and done >= self.stop_at_epoch
        last = done == cfg.epochs
        if self.previews is not None and (last or stopping or (cfg.recon_every and done % cfg.recon_every == 0)):
            from .recon import save_recon

            panel = self.method.reconstruct(self.previews)
            self.recon_files.append(str(save_recon(self.out / "recon" / f"epoch_{done:03d}.png", panel)))
            self.logger.add_image("recon", panel, self.step)
        if last or stopping or done % cfg.checkpoint_every == 0:
            self.save(done)
        return stopping

    def save(self, done: int) -> None:
        """checkpoints/last.pt (rank 0 writes; every rank's RNG streams and per-rank method state are gathered)."""
        fabric = self.fabric
        rng = _gather(fabric, capture_rng(self.generator))
        per_rank = _gather(fabric, self.method.rank_state_dict())
        if self.zero:
            state = {"config": self.cfg.model_dump(mode="json"), "epoch": done, "step": self.step,
                     "world_size": self.world, "data": self.data.fingerprint(), "data_content": self.content,
                     "init": self.init_info, **self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "precision": fabric.strategy.precision.state_dict(),
                     "data_order": self.sampler.state_dict(), "rng": rng,
                     **{k: [r[k] for r in per_rank] for k in per_rank[0]}}
            save_checkpoint(self.ckpt_file, state, out=self.out)
        fabric.barrier()

    # -- the end ---------------------------------------------------------------------------------------------------
    def finish(self) -> dict | None:
        """Export the encoder and check that timm loads it, write summary.json (rank 0)."""
        self.logger.close()
        summary = None
        if self.zero:
            enc = self.method.encoder()
            paths = export_encoder(enc, self.out, self.cfg.arch, extra=self.method.export_extra())
            missing = check_encoder(paths["encoder"], self.cfg.arch, timm_kwargs(enc))
            record = self._summary(paths, missing)
            record.write(self.out / "summary.json")
            summary = record.model_dump()
            self.emit("end", self.step, self.total_steps, summary)
        if self.hook is not None:
            self.hook("end", {"rank": self.rank, "model": self.method.model})
        self.fabric.barrier()
        return summary

    def _summary(self, paths: dict, missing: list[str]):
        from .summary import PretrainSummary

        cfg, data, secs, rows = self.cfg, self.data, self.epoch_seconds, self.rows
        return PretrainSummary(
            run=str(self.out), epochs_done=self.epochs_done, epochs=cfg.epochs, steps=self.step,
            resumed_from_epoch=self.start_epoch if self.ckpt is not None else None, images=len(data),
            split=data.split, world_size=self.world, effective_batch=effective_batch(cfg, self.world),
            lr=self.peak_lr, lr_rule=self.lr_rule, optimizer=cfg.optimizer, precision=cfg.precision,
            **self.method.summary_fields(rows), roi_stats=data.roi_stats, init=self.init_info,
            saliency_stats=data.saliency_stats or None, warnings=self.run_warnings, notes=self.notes,
            first_loss=rows[0]["loss"] if rows else None, final_loss=self.last_row.get("loss"),
            seconds=time.perf_counter() - self.t0, seconds_per_epoch=float(np.mean(secs)) if secs else None,
            images_per_s=(self.micro * cfg.batch_size * self.world * len(secs) / sum(secs)) if secs else None,
            encoder=str(paths["encoder"]), encoder_d2=str(paths["encoder_d2"]) if "encoder_d2" in paths else None,
            encoder_missing_keys=missing, checkpoint=str(self.ckpt_file), metrics=str(self.logger.path),
            recon=self.recon_files)
