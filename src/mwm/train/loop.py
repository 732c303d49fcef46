"""The pretraining loop, run by every rank under Lightning Fabric (:func:`mwm.train.pretrain.pretrain` launches it).

One micro-step: normalize the batch → draw keep-masks on the device from this rank's generator (seeded by
(seed, rank), so ranks mask differently) → ``model(x, keep)["loss"] / accumulate`` backward (gradient sync
skipped on all but the last micro-step of an optimizer step) → after ``accumulate`` micro-steps: clip, optimizer
step, scheduler step (per optimizer step), EMA update. Nothing in the step reads a value back to the host: the
loss, mask ratios and gradient norm are summed on the device and all-reduced + read once every ``log_every``
optimizer steps (and at every epoch end, so a checkpoint never holds half a logging interval).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..config import save_config
from ..errors import MWMError
from ..io import atomic_write_text
from .checkpoint import (capture_rng, check_resumable, checkpoint_path, clean_orphans, load_checkpoint, restore_rng,
                         save_checkpoint)
from .config import PretrainConfig
from .data import CONTENT_SAMPLE, EpochSampler, PretrainDataset, collate, load_pretrain_data, micro_batches_per_epoch
from .export import check_encoder, export_encoder, timm_kwargs
from .metrics import MetricsLogger, read_metrics
from .optim import build_optimizer, build_pretrain_scheduler, effective_batch

__all__ = ["run", "mask_seed"]



def mask_seed(seed: int, rank: int) -> int:
    """The mask generator's seed for ``rank``: distinct per rank, reproducible per (seed, rank)."""
    return int(np.random.SeedSequence([seed, rank, 0x6D61736B]).generate_state(1, np.uint64)[0] >> 1)


def _stat_vector(loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """(6,) on the device: loss, mask ratio, masked-ROI / ROI / masked-background / background patch fractions."""
    ratio = stats["mask_ratio"].to(loss.dtype)
    if "roi_fraction" not in stats:
        z = torch.zeros((), dtype=loss.dtype, device=loss.device)
        return torch.stack([loss, ratio, z, z, z, z])
    f = stats["roi_fraction"].to(loss.dtype)
    return torch.stack([loss, ratio, stats["mask_ratio_in"].to(loss.dtype) * f, f,
                        stats["mask_ratio_out"].to(loss.dtype) * (1 - f), 1 - f])


def _mean_ratios(rows: list[dict], cfg: PretrainConfig) -> dict:
    """Realised mask ratios averaged over the run's logged rows (metrics.csv): overall, and inside / outside the
    ROI — for the saliency strategies, the salient half of each image's patches / the other half — so
    summary.json shows whether the guided region was masked more."""
    from ..masking import strategy_requires

    out: dict = {}
    for k in ("mask_ratio", "mask_ratio_in", "mask_ratio_out"):
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
    saliency = "saliency" in strategy_requires(cfg.masking.strategy)
    out["in_means"] = ("the top half of each image's patches by saliency" if saliency
                       else "the ROI patches" if cfg.rois is not None else None)
    return out


def _gather(fabric, obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if fabric.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * fabric.world_size
    dist.all_gather_object(out, obj)
    return out


def _input_stats(model, normalize: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) (1, 3, 1, 1) of the timm arch's pretrained config, or (0, 1) when not normalizing."""
    if not normalize:
        return torch.zeros(1, 3, 1, 1, device=device), torch.ones(1, 3, 1, 1, device=device)
    cfg = getattr(getattr(model.encoder, "model", None), "pretrained_cfg", None) or {}
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def _default_workers(fabric, cfg: PretrainConfig) -> int:
    local = max(1, fabric.world_size // cfg.num_nodes)
    return min(4, max(0, (os.cpu_count() or 1) // local - 1))


def _forward_kwargs(cfg: PretrainConfig, grid: tuple[int, int]) -> dict:
    # MAE gathers the visible tokens; giving it the (exact, known) visible count avoids reading it from the mask,
    # a host sync per step. The strategy says how many it keeps (those that vary it are rejected for MAE by the config).
    if cfg.model.method != "mae":
        return {}
    from ..masking import visible_count

    return {"n_visible": visible_count(cfg.masking, grid[0] * grid[1])}


def run(fabric, cfg: PretrainConfig, progress=None, stop_at_epoch: int | None = None, hook=None) -> dict | None:
    """Train on this rank. Returns the summary on global rank 0, None elsewhere.

    progress(kind, done, total, info): called on rank 0 only; kinds "decode" (images), "start", "step" (every
    log interval, info = the metrics row), "epoch" (info: epoch, loss, seconds), "end" (info = summary).
    stop_at_epoch: stop after this many epochs in total (checkpointing first), as if the job were killed there.
    hook(event, info): called on every rank ("step": rank, step, keep; "end": rank, model) — for tests.

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
        return _run(fabric, cfg, progress, stop_at_epoch, hook)


def _run(fabric, cfg: PretrainConfig, progress=None, stop_at_epoch: int | None = None, hook=None) -> dict | None:
    """:func:`run`'s body, with the folder lock held."""
    import warnings

    from lightning.fabric.utilities.seed import seed_everything
    from torch.utils.data import DataLoader

    from ..masking import MaskingBatch, create_masker
    from ..mim import create_mim_model

    t0 = time.perf_counter()
    rank, world, zero = fabric.global_rank, fabric.world_size, fabric.is_global_zero
    out = Path(cfg.out)
    ckpt_file = checkpoint_path(out)

    def emit(kind, done=0, total=None, info=None):
        if zero and progress is not None:
            progress(kind, done, total, info or {})

    # -- the run folder: a new run never overwrites a checkpoint; a resumed one must match it ------------------
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_file)
        check_resumable(ckpt["config"], cfg, ckpt_file)
        if ckpt["world_size"] != world:
            raise MWMError(f"{ckpt_file} was written by {ckpt['world_size']} rank(s), this run has {world}: the "
                           "effective batch, learning rate and data shards would change. Resume on the same number "
                           "of devices × nodes, or start a new run with another --out")
    elif ckpt_file.exists():
        raise MWMError(f"{out} already holds a run ({ckpt_file}); pass --resume to continue it, or choose another "
                       "--out for a new run")
    fabric.barrier()  # every rank has looked before rank 0 writes anything
    notes: list[str] = []
    if zero:
        removed = clean_orphans(out)  # safe: rank 0 holds the folder's lock, so no other writer is running
        if removed:
            notes.append(f"removed {len(removed)} temporary checkpoint file(s) a killed run left in "
                         f"{ckpt_file.parent} ({', '.join(removed[:3])})")

    # -- the model first (a wrong arch or --init fails before a long decode), then the --init weights --------
    seed_everything(cfg.seed, verbose=False)
    try:
        model = create_mim_model(cfg.model)
    except ValueError as e:
        raise MWMError(str(e)) from e
    init_info = ckpt.get("init") if ckpt is not None else None  # resuming: the checkpoint's weights win
    if ckpt is None and cfg.init.lower() not in ("none", "random"):
        from ..weights import resolve_init
        from .init import apply_init

        init_info = apply_init(model, resolve_init(cfg.init, cfg.arch, timm_kwargs(model), cfg.init_sha256))
    if zero:
        out.mkdir(parents=True, exist_ok=True)
        # resume is an action, not a property of the run: config.yaml must start this run afresh when given alone;
        # it pins the init weights by hash
        save_config(cfg.model_copy(update={"resume": False, "init_sha256": (init_info or {}).get("sha256")}),
                    out / "config.yaml")

    data = load_pretrain_data(cfg, progress=(lambda k: emit("decode", k)) if zero else None)
    if ckpt is not None and ckpt["data"] != data.fingerprint():
        raise MWMError(f"{ckpt_file}: the data differ from the run's ({len(data)} images now); resume on the same "
                       "data, split and limit")
    content = data.content_fingerprint()
    if ckpt is not None and ckpt.get("data_content", content) != content:
        raise MWMError(f"{ckpt_file}: the images have the run's ids but other pixels (a sample of "
                       f"{CONTENT_SAMPLE} images spread over the data is hashed): the scans were replaced, "
                       "re-exported or read differently. Resume on the same data, or start a new run with another "
                       "--out")
    run_warnings = list(data.warnings)
    if zero:
        for w in run_warnings:
            warnings.warn(w, stacklevel=1)

    # -- model, EMA, optimizer, schedule ---------------------------------------------------------------------
    model = model.to(fabric.device)  # on the device first: loaded optimizer state follows
    grid = model.grid(cfg.size)
    ema = None
    if cfg.ema is not None:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema)  # a copy taken before sync-BN conversion (no process groups in it)
    if world > 1 and cfg.sync_bn and fabric.device.type == "cuda" and hasattr(model, "convert_sync_batchnorm"):
        # the model's own conversion keeps BatchNorm masked (statistics over visible positions); CUDA only because
        # DDP refuses torch's SyncBatchNorm (the decoder's dense blocks) on CPU modules
        model.convert_sync_batchnorm()
    optimizer, peak_lr, lr_rule = build_optimizer(model, cfg, world)
    micro = micro_batches_per_epoch(len(data), cfg.batch_size, cfg.accumulate, world)
    eff = effective_batch(cfg, world)
    if micro == 0:
        raise MWMError(f"{cfg.data}: {len(data)} images (split '{data.split}') are fewer than one optimizer step "
                       f"of {eff} (batch {cfg.batch_size} × accumulate {cfg.accumulate} × {world} rank(s)); lower "
                       "--batch-size or --accumulate")
    steps_per_epoch = micro // cfg.accumulate
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    if zero and warmup_steps >= total_steps:
        import warnings

        warnings.warn(f"warmup ({warmup_steps} steps = {cfg.warmup_epochs:g} epochs) is as long as the whole run "
                      f"({total_steps} steps): the lr never reaches its peak; lower --warmup-epochs", stacklevel=1)
    scheduler = build_pretrain_scheduler(optimizer, cfg, total_steps, warmup_steps)  # SparK's lr + wd annealing
    mask_gen = torch.Generator(device=fabric.device).manual_seed(mask_seed(cfg.seed, rank))

    start_epoch, step = 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        # the schedule's length comes from this config (epochs may have changed), its position from the
        # checkpoint; lr and weight decay are re-applied for the current step (LrWdScheduler.load_state_dict)
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            if ckpt.get("ema") is None:
                raise MWMError(f"{ckpt_file} has no EMA weights; resume without --ema")
            ema.module.load_state_dict(ckpt["ema"])
        fabric.strategy.precision.load_state_dict(ckpt.get("precision") or {})
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])

    model, optimizer = fabric.setup(model, optimizer)
    raw = model.module  # the MIM model itself: checkpoints, EMA, previews and export use it (never the DDP wrapper)

    # -- data loader -------------------------------------------------------------------------------------------
    sampler = EpochSampler(len(data), micro * cfg.batch_size, world, rank, cfg.seed)
    workers = cfg.workers if cfg.workers is not None else _default_workers(fabric, cfg)
    dataset = PretrainDataset(data.images, data.boxes, cfg.augment, data.saliency)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                        drop_last=True, pin_memory=fabric.device.type == "cuda", persistent_workers=workers > 0)
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)  # sharding is EpochSampler's

    masker = create_masker(cfg.masking)
    wants_outputs = "model_outputs" in masker.requires  # only then are the step's outputs kept for the next
    prev_outputs = None
    fwd = _forward_kwargs(cfg, grid)
    mean, std = _input_stats(raw, cfg.normalize, fabric.device)
    has_rois = data.has_rois

    logger = MetricsLogger(out, enabled=zero, resume_step=step if ckpt is not None else None)
    rows = read_metrics(logger.path) if (zero and ckpt is not None) else []
    recon_set = None
    if zero and cfg.recon_images > 0:
        from .recon import ReconSet

        recon_set = ReconSet(data.images, data.boxes, cfg.recon_images, masker, grid, cfg.seed, has_rois,
                             saliency=data.saliency)

    if ckpt is not None:  # last, so nothing above (model init, loader setup) draws from the restored streams
        states = ckpt["rng"]
        restore_rng(states[rank], mask_gen)
        masker.load_state_dict((ckpt.get("masking") or [{}] * world)[rank])
    emit("start", step, total_steps, {"lr": peak_lr, "lr_rule": lr_rule, "images": len(data), "world_size": world,
                                      "steps_per_epoch": steps_per_epoch, "start_epoch": start_epoch,
                                      "split": data.split, "roi_stats": data.roi_stats, "notes": notes,
                                      "saliency_stats": data.saliency_stats or None,
                                      "init": init_info if ckpt is None else None})

    # device accumulators per micro-step: [loss, mask_ratio, masked ROI, ROI, masked background, background] as
    # fractions of the batch's patches, so in/out ratios pool over micro-steps and ranks (a batch without any ROI
    # patch adds nothing instead of a ratio of 0); grad norm per optimizer step
    acc = torch.zeros(6, device=fabric.device)
    gn_acc = torch.zeros((), device=fabric.device)
    n_micro = n_steps = 0
    epoch_loss = torch.zeros((), device=fabric.device)
    t_log = time.perf_counter()
    epoch_seconds: list[float] = []
    recon_files: list[str] = []
    last_row: dict = rows[-1] if rows else {}
    first_hook = True

    def flush(epoch: int) -> None:
        nonlocal n_micro, n_steps, t_log, last_row
        if n_micro == 0:
            return
        vec = fabric.all_reduce(torch.cat([acc / n_micro, (gn_acc / max(1, n_steps)).view(1)]), reduce_op="mean")
        vals = vec.tolist()  # the one host sync of a logging interval
        now = time.perf_counter()
        ratio_in = vals[2] / vals[3] if has_rois and vals[3] > 0 else None
        ratio_out = vals[4] / vals[5] if has_rois and vals[5] > 0 else None
        row = {"step": step, "epoch": epoch + 1, "loss": vals[0], "lr": lr_used, "mask_ratio": vals[1],
               "mask_ratio_in": ratio_in, "mask_ratio_out": ratio_out, "grad_norm": vals[6] if cfg.clip_grad else None,
               "images_per_s": n_micro * cfg.batch_size * world / max(now - t_log, 1e-9),
               "elapsed_s": now - t0}
        if not math.isfinite(row["loss"]):
            raise MWMError(f"the loss became {row['loss']} at step {step}; lower --lr/--base-lr, keep --clip-grad "
                           "on, or use --precision bf16-mixed instead of 16-mixed")
        logger.log(row)
        rows.append(row)
        last_row = row
        emit("step", step, total_steps, row)
        acc.zero_()
        gn_acc.zero_()
        n_micro = n_steps = 0
        t_log = now

    lr_used = scheduler.get_last_lr()[0]
    epochs_done = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        sampler.use_epoch(epoch)
        model.train()
        epoch_loss.zero_()
        for i, (x, boxes, valid, *smap) in enumerate(loader):
            last_micro = (i + 1) % cfg.accumulate == 0
            # the saliency map (B, S, S) comes only with the saliency strategies
            keep, stats = masker(MaskingBatch(
                batch_size=x.shape[0], grid=grid, generator=mask_gen, device=fabric.device, images=x,
                boxes=boxes if has_rois else None, valid=valid if has_rois else None,
                importance=smap[0] if smap else None, outputs=prev_outputs))
            x = (x - mean) / std
            if hook is not None and first_hook:
                hook("step", {"rank": rank, "step": step, "keep": keep.detach().cpu()})
                first_hook = False
            with fabric.no_backward_sync(model, enabled=not last_micro):
                outputs = model(x, keep, **fwd)
                loss = outputs["loss"]
                fabric.backward(loss / cfg.accumulate)
            if wants_outputs:
                prev_outputs = {k: v.detach() for k, v in outputs.items() if isinstance(v, torch.Tensor)}
                masker.update(prev_outputs)
            del outputs  # not held into the next step unless the strategy asked for it
            loss = loss.detach()
            acc += _stat_vector(loss, stats)
            epoch_loss += loss
            n_micro += 1
            if not last_micro:
                continue
            if cfg.clip_grad is not None:
                # error_if_nonfinite=False: checking would read the norm back every step (a host sync)
                gn_acc += fabric.clip_gradients(model, optimizer, max_norm=cfg.clip_grad, error_if_nonfinite=False)
            lr_used = scheduler.get_last_lr()[0]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            n_steps += 1
            if ema is not None:
                ema.update(raw, step=step)
            if step % cfg.log_every == 0:
                flush(epoch)
        flush(epoch)  # the epoch's tail, so checkpoints fall on whole logging intervals
        done = epochs_done = epoch + 1
        epoch_seconds.append(time.perf_counter() - t_epoch)
        mean_loss = float(fabric.all_reduce(epoch_loss / micro, reduce_op="mean"))
        emit("epoch", step, total_steps, {"epoch": done, "epochs": cfg.epochs, "loss": mean_loss,
                                          "seconds": epoch_seconds[-1]})
        stopping = stop_at_epoch is not None and done >= stop_at_epoch
        last = done == cfg.epochs
        if zero and recon_set is not None and (last or stopping or (cfg.recon_every and done % cfg.recon_every == 0)):
            from .recon import render_recon, save_recon

            panel = render_recon(raw, recon_set, mean, std, fabric.device, fwd)
            recon_files.append(str(save_recon(out / "recon" / f"epoch_{done:03d}.png", panel)))
            logger.add_image("recon", panel, step)
        if last or stopping or done % cfg.checkpoint_every == 0:
            rng = _gather(fabric, capture_rng(mask_gen))
            masking_state = _gather(fabric, masker.state_dict())  # per rank, as the mask generators
            if zero:
                save_checkpoint(ckpt_file, {
                    "config": cfg.model_dump(mode="json"), "epoch": done, "step": step, "world_size": world,
                    "data": data.fingerprint(), "data_content": content, "init": init_info,
                    "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
                    "precision": fabric.strategy.precision.state_dict(), "data_order": sampler.state_dict(),
                    "rng": rng, "masking": masking_state}, out=out)
            fabric.barrier()
        if stopping:
            break
    logger.close()

    summary = None
    if zero:
        export_from = ema.module if ema is not None else raw
        paths = export_encoder(export_from, out, cfg.arch, extra={
            "size": cfg.size, "method": cfg.model.method, "ema": cfg.ema is not None,
            "normalize": {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()} if cfg.normalize else None})
        missing = check_encoder(paths["encoder"], cfg.arch, timm_kwargs(export_from))
        summary = {
            "run": str(out), "epochs_done": epochs_done,
            "epochs": cfg.epochs, "steps": step, "resumed_from_epoch": start_epoch if ckpt is not None else None,
            "images": len(data), "split": data.split, "world_size": world, "effective_batch": eff,
            "lr": peak_lr, "lr_rule": lr_rule, "optimizer": cfg.optimizer, "precision": cfg.precision,
            "masking": cfg.masking.strategy, "mask_grid": list(grid),  # (h, w) cells the masker drew on
            "roi_stats": data.roi_stats, "init": init_info,
            "saliency_stats": data.saliency_stats or None, "mask_ratios": _mean_ratios(rows, cfg),
            "warnings": run_warnings, "notes": notes,
            "first_loss": rows[0]["loss"] if rows else None, "final_loss": last_row.get("loss"),
            "seconds": time.perf_counter() - t0,
            "seconds_per_epoch": float(np.mean(epoch_seconds)) if epoch_seconds else None,
            "images_per_s": (micro * cfg.batch_size * world * len(epoch_seconds) / sum(epoch_seconds))
            if epoch_seconds else None,
            "encoder": str(paths["encoder"]), "encoder_d2": str(paths["encoder_d2"]) if "encoder_d2" in paths else None,
            "encoder_missing_keys": missing, "checkpoint": str(ckpt_file), "metrics": str(logger.path),
            "recon": recon_files,
        }
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        emit("end", step, total_steps, summary)
    if hook is not None:
        hook("end", {"rank": rank, "model": raw})
    fabric.barrier()
    return summary
