"""Setting up one stage of a run just before it trains (a recipe has one stage or several,
tl/stages.py): what trains and its optimizer, what the loop reads (stored features where a
frozen prefix makes them exact, else images), the loaders, the schedule, and, for a run
resumed inside this stage, the optimizer and scheduler state it had."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tl import TLError
from tl.data import make_loaders, val_resize
from tl.engine import distributed, feature_store
from tl.engine.ema import val_net
from tl.engine.feature_store import CachePlan, FeaturePass
from tl.engine.image_cache import DecodedImages, decoded_images
from tl.engine.resume import how_to_continue
from tl.loop import Hooks
from tl.stages import Span


@dataclass
class StageSetup:
    """Everything one stage trains with."""

    span: Span
    optimizer: torch.optim.Optimizer
    scheduler: object
    net: nn.Module  # what the loop trains: the model, or the model behind stored features, maybe in DDP
    loaders: dict
    plan: CachePlan  # what is cached, and why
    scored: nn.Module | None = None  # what val scores when it is not `net`: the average of the weights (--ema)


def either(value, default):
    """A stage's own setting, or the recipe's where the stage leaves it open (None)."""
    return default if value is None else value


def stage_hooks(span: Span, recipe, scheduler) -> Hooks:
    """The loop's settings that a stage (or the recipe behind it) decides."""
    return Hooks(scheduler=scheduler, scheduler_interval=span.stage.interval,
                 frozen_bn_eval=either(span.stage.frozen_bn_eval, recipe.frozen_bn_eval),
                 bn_eval=either(span.stage.bn_eval, recipe.bn_eval))


def start_stage(span: Span, ctx, ckpt: dict | None) -> StageSetup:
    """Set up `span`'s stage for the run `ctx` (a `tl.engine.run.RunContext`). A run resumed
    inside this stage gets its optimizer and scheduler state back (`ckpt`); one resumed at the
    boundary starts the stage fresh, as the uninterrupted run did."""
    ctx.log(f"stage {span.index + 1}: {span.stage.name}, training epochs {max(span.start, 1)}..{span.end - 1}")
    optimizer = span.stage.setup(ctx.model, ctx.spec, ctx.recipe)
    saved = ckpt.get("stage", {"index": 0, "end": None}) if ckpt is not None else None
    resumed_inside = saved is not None and saved["index"] == span.index
    saved_stage = next((s for s in ckpt["config"].get("stages", []) if s["index"] == span.index),
                       {}) if resumed_inside else {}
    saved_mode = saved_stage.get("feature_cache", ckpt["config"].get("feature_cache")) if resumed_inside else None
    plan = plan_inputs(span, ctx, saved_mode, saved_stage.get("cached_phases"))
    loaders = stage_loaders(ctx, plan)
    say_plan(ctx, plan, saved_mode)
    net = plan.net
    if distributed.is_distributed():  # [DDP] on its device and layout first: DDP copies process 0's weights to all;
        # a new DDP wrapper per stage, since it records which parameters train when it is made
        net.to(ctx.device, memory_format=torch.channels_last if ctx.opts.channels_last else torch.contiguous_format)
        net = distributed.wrap(net, ctx.device, ctx.opts.sync_bn)
    stage = span.stage
    scheduler = stage.schedule(optimizer, span.epochs, len(loaders["train"])) if stage.schedule else None
    if resumed_inside:
        ctx.model.to(ctx.device)  # optimizer state is loaded onto its parameters' device: the one this run trains on
        if scheduler is not None and saved["end"] not in (None, span.end):
            raise TLError(f"this run's stage {stage.name!r} laid out its learning-rate schedule for training "
                          f"epochs up to {saved['end'] - 1}; resuming with another --epochs total would bend "
                          f"it; " + how_to_continue(ckpt, finished=ckpt["epoch"] == ckpt["config"].get("train_epochs")))
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt["scheduler"] is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
    scored = None if ctx.ema is None else val_net(ctx.ema, plan.net, ctx.spec, ctx.device, ctx.opts.channels_last)
    return StageSetup(span, optimizer, scheduler, net, loaders, plan, scored)  # --ema: one average over every stage,
    # scored in this stage's form


def plan_inputs(span: Span, ctx, saved_mode: str | None, saved_phases: list[str] | None) -> CachePlan:
    """Stored features where this stage's frozen prefix makes them exact (computed from the
    weights just built or restored), else images. A stage resumed after an interruption keeps
    what it did before: uncached stays uncached, an uncached phase stays so (the cache's folded
    BatchNorm differs from the live network in the last float bits)."""
    model, opts, log = ctx.model, ctx.opts, ctx.log
    saved = CachePlan.recorded(model, saved_mode) if saved_mode is not None else None
    if saved is not None and saved.off:
        plan = saved  # the stage trained uncached before the interruption (a full disk, say): its rest does too
    elif opts.feature_cache:
        bn = stage_hooks(span, ctx.recipe, None)  # the loop's BatchNorm settings: the cache's check tries the same
        how = FeaturePass(seed=opts.seed, workers=opts.workers, device=ctx.device, channels_last=opts.channels_last,
                          dtype=torch.float32)
        # [DDP] process 0 computes and stores the features first; the others wait, then load them.
        # fork_rng: the cache's probe and passes draw nothing from the run's RNG
        with distributed.main_first(), torch.random.fork_rng(devices=[]):
            plan = feature_store.plan_cache(model, ctx.spec, ctx.sets, how, frozen_bn_eval=bn.frozen_bn_eval,
                                            bn_eval=bn.bn_eval, augment=opts.augment, views=opts.cache_views,
                                            limit_gb=opts.cache_limit_gb, log=log)
        main = CachePlan.recorded(model, distributed.from_main(plan.mode))  # [DDP] process 0's decision
        if main.off and not plan.off:
            plan = main  # process 0 trains uncached (its disk had no room, say): so does every process
        elif main.kind != plan.kind:
            log(f"warning: process 0 trains with the feature cache '{main.mode}', this process with '{plan.mode}'")
        if saved_phases is not None and set(plan.cached) - set(saved_phases):
            kept = {p: fs for p, fs in plan.cached.items() if p in saved_phases}
            # (a checkpoint that recorded no mode in words, only the phases: the phases say it)
            plan = CachePlan(plan.net if kept else model, kept, why_off=None if kept else "",
                             description=saved.kind if saved is not None else " + ".join(sorted(kept)),
                             recorded_as=saved_mode or "")
    else:
        plan = CachePlan(model, why_off="")
    return plan


def say_plan(ctx, plan: CachePlan, saved_mode: str | None) -> None:
    """The stage's feature-cache line (said once its loaders are made, after an --image-cache's
    lines), and a warning where a resumed stage now caches otherwise than before."""
    ctx.log(f"feature cache: {plan.mode}")
    saved = CachePlan.recorded(ctx.model, saved_mode) if saved_mode is not None else None
    if saved is not None and saved.kind != plan.kind:
        ctx.log(f"warning: before the interruption this stage trained with the feature cache '{saved.mode}', now "
                f"'{plan.mode}'; the rest of the run may differ from an uninterrupted one in the last float bits")


def stage_loaders(ctx, plan: CachePlan) -> dict:
    """The phase dict of loaders over what this stage reads: stored features, decoded images
    (`--image-cache`, shared by the stages in `ctx.decoded`) or the image files."""
    opts = ctx.opts
    if opts.image_cache or opts.device_images:
        for p, ds in ctx.sets.items():
            if p not in plan.cached and p not in ctx.decoded:
                ctx.decoded[p] = decoded_images(ds, val_resize(opts.image_size), opts.cache_limit_gb, ctx.log,
                                                device=ctx.device if opts.device_images else None)
    inputs = {p: plan.cached.get(p, ctx.decoded.get(p, ds)) for p, ds in ctx.sets.items()}
    # images already on the device are transformed in this process and need no pinned copy
    on_device = opts.device_images and any(isinstance(ds, DecodedImages) for ds in inputs.values())
    loaders = make_loaders(inputs, ctx.recipe.batch_size, seed=opts.seed,
                           workers=0 if len(plan.cached) == len(ctx.sets) or on_device else opts.workers,
                           pin_memory=ctx.device.type == "cuda" and not on_device, generator=ctx.generator,
                           sample_weights=ctx.sample_weights, shard=distributed.sampler)
    for phase, ds in inputs.items():
        if getattr(ds, "collate", None) is not None:  # --device-images: a batch augmented at once (BatchedCrops)
            loaders[phase].collate_fn = ds.collate
    return loaders
