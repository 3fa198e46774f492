"""Training on several processes (Lightning's DDP): which process this is, the checks made
before any work, the Trainer settings, and validation over the whole validation set.

Lightning starts the processes itself on one machine (it re-runs the command once per extra
device); across machines ``torchrun`` or SLURM starts one command per process and Lightning
reads their environment. Every process runs :func:`lensforge.train` from the start: each
reads the data and makes the same split (sorted, seeded: :func:`SameData` checks it), and only
the first process (global rank 0) writes anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lensforge.config import TrainConfig
from lensforge.errors import ConfigError
from lensforge.hardware import cpu_count

log = logging.getLogger(__name__)

# the strategies whose processes each run the whole command (script launch), which is what the
# rank-0-writes-everything rule and the callbacks' state assume; ddp_spawn/fork would train in
# children of a process that then lacks the epoch history, FSDP/DeepSpeed shard the weights
STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true")


def world_size(cfg: TrainConfig) -> int:
    """Processes taking part: devices per machine × machines."""
    return cfg.devices * cfg.num_nodes


def process_rank(cfg: TrainConfig) -> int:
    """This process's global rank, from its launcher's environment (0 when alone): torchrun
    sets RANK, SLURM's srun SLURM_PROCID, Lightning's own launcher NODE_RANK and LOCAL_RANK."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"])
    node = int(env.get("NODE_RANK") or env.get("GROUP_RANK") or 0)
    return node * cfg.devices + int(env.get("LOCAL_RANK") or 0)


def is_primary(cfg: TrainConfig) -> bool:
    """Whether this process writes the run directory, bundle, plots, report and tracking."""
    return process_rank(cfg) == 0


def accelerator(cfg: TrainConfig) -> str:
    """"cpu" or "gpu": what ``auto`` means on this machine."""
    if cfg.accelerator != "auto":
        return cfg.accelerator
    return "gpu" if torch.cuda.is_available() else "cpu"


def check_distributed(cfg: TrainConfig) -> None:
    """Refuse a strategy Lightning does not know (or lensforge does not run), more processes
    than this machine has cores or GPUs, and a launcher that started another number of
    processes than ``devices × num_nodes``: one ConfigError, before any work."""
    if cfg.strategy not in STRATEGIES:
        from lightning.pytorch.strategies import StrategyRegistry

        if cfg.strategy not in StrategyRegistry.available_strategies():
            raise ConfigError(f"unknown strategy {cfg.strategy!r}: Lightning knows no such strategy; "
                              f"lensforge trains with {', '.join(STRATEGIES)}")
        raise ConfigError(f"strategy {cfg.strategy!r} is not supported by lensforge train; use one of {', '.join(STRATEGIES)}")
    kind = accelerator(cfg)
    if kind == "cpu" and cfg.devices > cpu_count():
        raise ConfigError(f"--devices {cfg.devices} asks for {cfg.devices} CPU processes but this machine lets lensforge "
                          f"use {cpu_count()} core(s); use --devices {cpu_count()} or fewer (each process needs a core)")
    if kind == "gpu":
        available = torch.cuda.device_count()
        if available == 0:
            raise ConfigError("--accelerator gpu but torch sees no CUDA GPU here; use --accelerator cpu or auto")
        if cfg.devices > available:
            raise ConfigError(f"--devices {cfg.devices} asks for {cfg.devices} GPUs but this machine has {available}")
    launched = os.environ.get("WORLD_SIZE")  # torchrun / Lightning's own children
    if launched is not None and int(launched) != world_size(cfg):
        raise ConfigError(f"the launcher started {launched} processes but --devices {cfg.devices} × --num-nodes "
                          f"{cfg.num_nodes} = {world_size(cfg)}; make them agree (torchrun: --nproc-per-node = "
                          "--devices, --nnodes = --num-nodes)")


def trainer_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The Trainer's accelerator, devices, num_nodes and strategy: one process as before, or
    DDP over gloo (CPU) / nccl (GPU) when ``devices × num_nodes > 1``."""
    kind = accelerator(cfg)
    if world_size(cfg) == 1:
        return {"accelerator": "auto" if cfg.accelerator == "auto" else kind, "devices": 1, "num_nodes": 1}
    from lightning.pytorch.strategies import DDPStrategy

    strategy = DDPStrategy(process_group_backend="nccl" if kind == "gpu" else "gloo",
                           find_unused_parameters=cfg.strategy == "ddp_find_unused_parameters_true")
    return {"accelerator": kind, "devices": cfg.devices, "num_nodes": cfg.num_nodes, "strategy": strategy}


def threads_per_process(cfg: TrainConfig) -> int:
    """torch threads for one process: the config's, else this machine's cores shared by its
    processes (two processes with every core each would fight over them)."""
    return cfg.threads or max(1, cpu_count() // cfg.devices)


def per_process_samples(n: int, world: int) -> int:
    """Training items one process sees per epoch: DistributedSampler pads to a multiple of the world."""
    return -(-n // world)


def scaling_note(cfg: TrainConfig) -> str:
    """What the run summary says about batch and learning rate under DDP. Rule: the learning
    rate is never scaled automatically (each process's gradients are averaged, so the step is
    that of one batch of ``batch × processes`` images); scale ``--lr`` yourself if you want to."""
    world = world_size(cfg)
    return (f"DDP: {world} processes ({cfg.devices} per machine × {cfg.num_nodes} machine(s), "
            f"{'nccl' if accelerator(cfg) == 'gpu' else 'gloo'}); effective batch {cfg.batch_size} × {world} = "
            f"{(cfg.batch_size or 0) * world} images per step; learning rate {cfg.lr:g} as given "
            "(not scaled with the processes)")


def distributed_meta(cfg: TrainConfig) -> dict[str, Any]:
    """What config.yaml records about the processes (for the reader of a run)."""
    world = world_size(cfg)
    return {"processes": world, "effective_batch_size": (cfg.batch_size or 0) * world, "lr_scaling": "none"}


def whole_set(order: Sequence[int], items: Sequence[Any], n: int) -> list[Any]:
    """The validation items of every process, as one list in dataset order, each index once.

    ``order[i]`` is the dataset index of ``items[i]`` on this process. Under DDP each process
    validates a DistributedSampler shard, padded with repeats of the first indices so that
    every shard has the same length; metrics of one shard, or of the shards concatenated,
    would count those repeats twice. Alone (no process group) this only sorts."""
    pairs = list(zip((int(i) for i in order), items, strict=True))
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, pairs)
        pairs = [p for part in gathered for p in part]
    merged: dict[int, Any] = {}
    for i, item in pairs:
        merged.setdefault(i, item)  # a padded repeat: the same image under the same weights
    if sorted(merged) != list(range(n)):
        missing = sorted(set(range(n)) - set(merged))[:5]
        raise RuntimeError(f"validation covered {len(merged)} of {n} images (missing e.g. {missing}): "
                           "every validation image must be scored once")
    return [merged[i] for i in range(n)]


def loader_order(loader: Any) -> list[int]:
    """The dataset indices a (non-shuffling) validation loader yields on this process, in order:
    its sampler's (Lightning swaps in a DistributedSampler under DDP)."""
    return [int(i) for i in iter(loader.sampler)]


def data_digest(*datasets: Any) -> str:
    """A fingerprint of the records of each dataset (paths, in order)."""
    h = hashlib.sha256()
    for ds in datasets:
        for r in getattr(ds, "records", ()) or ():
            h.update(str(r.path).encode() + b"\0")
        h.update(b"|")
    return h.hexdigest()


class SameData(Callback):
    """Checks, once the processes are connected, that every one holds the same train and
    validation records (the split is made by each process from the sorted data and the seed):
    a process whose copy of the data differs would train a different set without a word."""

    def __init__(self, digest: str) -> None:
        self.digest = digest

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return
        digests: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(digests, self.digest)
        differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
        if differ:  # every process sees the same list, so all stop together
            raise ConfigError(f"process(es) {differ} read other training/validation images than process 0: "
                              "give every machine the same data at the same path")
