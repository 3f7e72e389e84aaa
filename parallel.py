"""
Training past one GPU's memory: how train.py shards the model over GPUs, trades compute for activation memory and
writes its checkpoints in shards. All of it is PyTorch's own machinery; this file chooses how to apply it.

A step of Adam in mixed precision keeps, for every parameter, its fp32 weight (4 bytes), its fp32 gradient (4) and
Adam's two fp32 moments (8): 16 bytes before any activation. DDP keeps all of it on every GPU. That fits iGPT-S, -M
and -L, but iGPT-XL's 6.8B parameters need 109 GB for it alone.

FSDP2 (torch.distributed.fsdp.fully_shard) cuts every parameter, with its gradient and its optimizer state, into
one shard per GPU along its first dimension, so each GPU keeps 16/N bytes a parameter. shard() makes every block a
unit of its own and the root (embeddings, final norm, heads) a last one. Before a block runs, forward or backward,
its shards are all-gathered into whole weights, in bf16 (MixedPrecisionPolicy's param_dtype), and freed after it;
its gradients are reduce-scattered back onto the shards in fp32 (reduce_dtype), where the optimizer steps. The root
is gathered in fp32 and the blocks' inputs are not cast, so the residual stream stays fp32 as it is under DDP's
autocast. The parameters become
DTensors: AdamW and clip_grad_norm_ work on them unchanged, the norm taken over every shard.

DDP (replicate) keeps the whole model on every GPU and averages the gradients by all-reduces of buckets that start
while the backward of the earlier layers still runs; the gradients are views into those buckets, so a step holds
one copy of them.

Activation checkpointing (checkpoint_blocks) keeps only each block's input for the backward and runs the block's
forward again there: a block then keeps 4 bytes per token and unit of width instead of about 38 (block_saves), for
one more forward pass of compute. It works under DDP and FSDP alike.

The checkpoints of sharded runs are folders written by torch.distributed.checkpoint (DCP): every rank writes its own
shards, and a run of any number of processes reads them back resharded. save_sharded writes into a temporary folder
and renames it into place once every rank is done, so a run killed while saving keeps its previous checkpoint.
DCP's metadata is a pickle: SafeReader unpickles only DCP's own record types, and SafeLoadPlanner reads the
non-tensor entries (the optimizer's settings) with torch.load(weights_only=True), so no checkpoint can run code.
load_weights reads a folder's model, whole, as load_checkpoint reads a .pt.

memory_estimate counts the bytes per GPU of a configuration; train.py refuses one that cannot fit (fit_error) and
prints it with --dry_run (describe).
"""
import contextlib
import os
import pickle
import shutil
import warnings
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel as DDP

from common import load_verified, save_verified
from igpt import IGPT, IGPTConfig, load_checkpoint


# ---- wrapping the model: DDP, or activation checkpointing, then FSDP ----

# MiB of gradients a DDP all-reduce carries. Larger than DDP's default (25): an all-reduce of a few MB over NVLink
# costs mostly its fixed latency, and torch.compile compiles each bucket's part of the model as a graph of its own
# (DDPOptimizer), which at the default cuts each of iGPT-L's blocks into several graphs; at this size they are a
# block each. Small enough that the last bucket, whose all-reduce starts only once the backward is done, is a small
# part of a step.
BUCKET_MB = 100


def replicate(model, device):
    """DDP over every process of the group, the all-reduce of each BUCKET_MB bucket overlapping the backward of
    the layers before it (also when the model is compiled: torch.compile splits its graph at the buckets). The
    gradients are views into the buckets, so a step holds one copy of them: zero them in place
    (zero_grad(set_to_none=False)), since a gradient set to None comes back as a new tensor that DDP copies into
    its bucket."""
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=BUCKET_MB,
               gradient_as_bucket_view=True)


def checkpoint_blocks(model):
    """Activation checkpointing, in place: every block of model.h keeps only its input for the backward and
    recomputes the rest there. The state_dict keeps its names (the wrapper's prefix is dropped from them)."""
    for i, block in enumerate(model.h):
        model.h[i] = checkpoint_wrapper(block, preserve_rng_state=False)  # the model draws no random numbers


def shard(model, device, param_dtype=None, compile=False):
    """FSDP2 over every process of the group: each block a unit gathered in param_dtype (None: as stored, fp32),
    compiled on its own when compile is set, then the root, gathered in fp32. Gradients are reduced in fp32.
    Each block moves to the device as it is sharded, so the whole model is never on one GPU. A process that
    torchrun did not start gets a group of its own to shard over."""
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # the blocks' inputs are not cast: the residual stream stays fp32, each product casts under autocast
    in_blocks = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for i, block in enumerate(model.h):
        if compile:  # a graph per block, FSDP's gathers between them; every block runs the same code, compiled once
            block = torch.compile(block)
        fully_shard(block, mesh=mesh, mp_policy=in_blocks)
        model.h[i] = block
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    register_fsdp_forward_method(model, "classify")  # fine-tuning calls classify(), not forward()
    return model


# ---- sharded checkpoints ----

TRAIN_STATE = "train_state.pt"  # in a checkpoint folder beside DCP's files: the config, palette, step, ...


@contextlib.contextmanager
def _alone_is_fine():
    """DCP warns whenever it runs without a process group; reading or writing a folder in one process is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_sharded(path, model, optimizer, palette=None, **extra):
    """Write the folder `path`: every rank its shards of the model's weights and of the optimizer's state (all ranks
    call this), rank 0 beside them TRAIN_STATE with the model's config, the palette and the extra entries (step,
    data position, ...). It is written as path.tmp and renamed into place once every rank is done."""
    tmp, first = path + ".tmp", _rank() == 0
    if first and os.path.exists(tmp):
        shutil.rmtree(tmp)  # left by a run killed while saving
    _barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _alone_is_fine():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    if first:
        state = {"config": asdict(model.config), **extra}
        if palette is not None:
            state["palette"] = torch.as_tensor(palette, dtype=torch.float32)
        save_verified(os.path.join(tmp, TRAIN_STATE), state)  # with checksums, as a .pt checkpoint
    _barrier()  # every rank's shards are on disk
    if first:
        _swap_in(tmp, path)
    _barrier()


def _swap_in(tmp, path):
    """Put the finished folder tmp at path. A kill between the two renames leaves the previous checkpoint whole at
    path.old, where find_checkpoint looks too."""
    old = path + ".old"
    if os.path.exists(path):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out):
    """The checkpoint in the run folder `out`: ckpt.pt (one process or DDP) or the folder ckpt.dcp (FSDP), the newer
    when a run started over with --force in the other kind has not yet replaced it; None when there is neither."""
    sharded = os.path.join(out, "ckpt.dcp")
    candidates = [os.path.join(out, "ckpt.pt"), sharded if os.path.exists(sharded) else sharded + ".old"]
    return max(filter(os.path.exists, candidates), key=os.path.getmtime, default=None)


def read_train_state(path):
    """The TRAIN_STATE of a checkpoint folder: everything save_sharded stored but the sharded tensors."""
    file = os.path.join(path, TRAIN_STATE)
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} is not a sharded igpt checkpoint: it has no {TRAIN_STATE} (an unfinished save "
                         "leaves a .tmp folder; the checkpoint before it is whole)")
    state = load_verified(file)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ValueError(f"{file!r} is not the train state of a sharded igpt checkpoint: copy the folder again")
    try:
        IGPTConfig(**state["config"])
    except TypeError as e:
        raise ValueError(f"{file!r} has a config this version does not read ({e})") from None
    return state


def read_state(path):
    """A checkpoint's state but its sharded tensors: of a .pt file, all of it (load_checkpoint); of a folder of
    save_sharded's, its TRAIN_STATE (read_train_state)."""
    return read_train_state(path) if os.path.isdir(path) else load_checkpoint(path)


def load_sharded(path, model, optimizer=None):
    """Read the folder `path` into model (sharded or not) and, when given, optimizer, in place: each rank reads the
    pieces its shards cover, whatever the number of processes that wrote them."""
    optimizers = [optimizer] if optimizer is not None else []
    model_state, optimizer_state = get_state_dict(model, optimizers)
    _read({"model": model_state, **({"optimizer": optimizer_state} if optimizers else {})}, path)
    set_state_dict(model, optimizers, model_state_dict=model_state, optim_state_dict=optimizer_state)


def load_weights(path):
    """A checkpoint as load_checkpoint returns it ({"config", "model", "palette", ...}) from a .pt file or a folder
    of save_sharded's; of a folder only the model is read, whole and on the CPU, not the optimizer's state."""
    if not os.path.isdir(path):
        return load_checkpoint(path)
    state = read_train_state(path)
    with torch.device("meta"):
        shapes = IGPT(IGPTConfig(**state["config"])).state_dict()
    weights = {name: torch.empty(t.shape, dtype=t.dtype) for name, t in shapes.items()}
    _read({"model": weights}, path)
    return {**state, "model": weights}


def _read(state, path):
    """dcp.load of the folder into state, in place, through SafeReader and SafeLoadPlanner; what they refuse is
    raised as the ValueError it is, not inside DCP's report of every rank's failures."""
    reader = SafeReader(path)
    reader.read_metadata()  # read first on its own: DCP would answer a refusal by looking for other metadata
    try:
        with _alone_is_fine():
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    except CheckpointException as e:
        refused = [error for error, _ in e.failures.values() if isinstance(error, ValueError)]
        if refused:
            raise refused[0] from None
        raise


# The classes a DCP metadata file may name: DCP's own records, and the torch types inside them.
_METADATA_CLASSES = {(dcp_metadata.__name__, name) for name, obj in vars(dcp_metadata).items()
                     if isinstance(obj, type) and obj.__module__ == dcp_metadata.__name__}
_METADATA_CLASSES |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                      ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                      ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                     torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's metadata")


class SafeReader(dcp.FileSystemReader):
    """DCP's reader of a checkpoint folder, with its metadata unpickled by _MetadataUnpickler."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        if not os.path.isfile(path):
            raise ValueError(f"{str(self.path)!r} is not a sharded checkpoint: it has no {os.path.basename(path)}")
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as e:
                raise ValueError(f"{str(path)!r} is refused: {e}") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, but an entry that is not a tensor must pass torch.load(weights_only=True) first: the default
    unpickles it with weights_only=False."""

    def load_bytes(self, read_item, value):
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"checkpoint entry {read_item.dest_index.fqn!r} is refused: it is more than tensors "
                             "and plain data (torch.load(weights_only=True) will not read it)") from None
        value.seek(0)
        super().load_bytes(read_item, value)


# ---- memory: what a configuration needs on each GPU ----

def block_saves(compute_bytes):
    """Bytes a block keeps for its backward per token and unit of width, with products in compute_bytes (2: bf16
    autocast, 4: fp32): the fp32 inputs of its two norms (4 + 4), the norms' outputs cast for the products after
    them (2 c), q, k, v and the attention's output (4 c; SDPA keeps no T x T scores), the heads side by side again
    for c_proj (c), and the MLP's 4x wide input and activation (8 c)."""
    return 8 + 15 * compute_bytes


def memory_estimate(config, micro_batch_size, world=1, fsdp=False, activation_checkpointing=False, compute_bytes=2):
    """Bytes per GPU of a training step: {"parameters" (a count), "weights", "gradients", "optimizer",
    "activations", "total"}.

    weights: the fp32 weights (a 1/world shard under FSDP) and the copies in compute precision in use: without FSDP,
    autocast's cast of every weight, kept from the forward to the backward; under FSDP two blocks gathered at a time
    (the one running and the next, prefetched) and the root, gathered in fp32. gradients: fp32 (a shard under FSDP,
    plus two blocks' whole gradients in flight; under DDP they are its communication buckets). optimizer: Adam's
    two fp32 moments (a shard under FSDP). activations: what the blocks keep for the backward (block_saves per token
    and unit of width), or with activation checkpointing each block's fp32 input and one block's recomputed
    tensors; then the final norm, the logits and their fp32 log-softmax. Not counted: the CUDA context, the
    allocator's fragmentation, workspaces, communication buffers. So a total over a GPU's memory cannot fit, and
    one just under it may not either."""
    with torch.device("meta"):  # one block shows the rest: count a model of one
        one = IGPT(replace(config, n_layer=1))
    n_block = sum(p.numel() for p in one.h[0].parameters())
    n = one.get_num_params() + (config.n_layer - 1) * n_block
    n_root = n - config.n_layer * n_block
    c, shards = compute_bytes, world if fsdp else 1
    weights, gradients, optimizer = 4 * n / shards, 4 * n / shards, 8 * n / shards
    if fsdp:
        weights += 2 * c * n_block + 4 * n_root
        gradients += 2 * (c + 4) * n_block + 4 * n_root
    else:
        weights += c * n if c < 4 else 0
    saved = 4 * config.n_layer + block_saves(c) if activation_checkpointing else block_saves(c) * config.n_layer
    per_token = (saved + 4 + c) * config.n_embd + (c + 8) * config.n_vocab
    parts = dict(weights=weights, gradients=gradients, optimizer=optimizer,
                 activations=per_token * config.block_size * micro_batch_size)
    return {"parameters": n, **parts, "total": sum(parts.values())}


def _gpus(n):
    return f"{n} GPU{'s' if n > 1 else ''}"


def _setup(world, fsdp, activation_checkpointing):
    where = f"FSDP on {_gpus(world)}" if fsdp else f"DDP on {_gpus(world)}" if world > 1 else "one GPU"
    return where + (" with activation checkpointing" if activation_checkpointing else "")


def describe(config, estimate, micro_batch_size, world=1, fsdp=False, activation_checkpointing=False):
    """The estimate as lines to print: the setup, then each part in GB."""
    lines = [f"{estimate['parameters'] / 1e9:.2f}B parameters ({config.n_layer} layers of width {config.n_embd}), "
             f"{_setup(world, fsdp, activation_checkpointing)}, micro-batch {micro_batch_size} of "
             f"{config.block_size} tokens; per GPU:"]
    lines += [f"  {part:12}{estimate[part] / 1e9:8.1f} GB" for part in ("weights", "gradients", "optimizer",
                                                                         "activations", "total")]
    return "\n".join(lines)


def fit_error(config, capacity, micro_batch_size, world=1, fsdp=False, activation_checkpointing=False,
              compute_bytes=2, batch_size=None):
    """None when the estimate fits in capacity bytes, else the one-line error to show: the parts, and the changes
    that would fit (activation checkpointing, the largest micro-batch, of those that divide each process's share
    of batch_size when it is given, the fewest GPUs under FSDP)."""
    setup = dict(world=world, fsdp=fsdp, activation_checkpointing=activation_checkpointing)

    def total(micro=micro_batch_size, **change):
        return memory_estimate(config, micro, compute_bytes=compute_bytes, **{**setup, **change})["total"]

    estimate = memory_estimate(config, micro_batch_size, compute_bytes=compute_bytes, **setup)
    if estimate["total"] <= capacity:
        return None
    gb = lambda b: f"{b / 1e9:.1f} GB"
    fixes = []
    if not activation_checkpointing and total(activation_checkpointing=True) <= capacity:
        fixes.append(f"--activation_checkpointing ({gb(total(activation_checkpointing=True))})")
    per_image = estimate["activations"] / micro_batch_size  # the rest does not grow with the micro-batch
    micro = int((capacity - estimate["total"] + estimate["activations"]) // per_image)
    if batch_size is not None:  # train.py takes only a micro-batch that divides each process's share
        micro = max((m for m in range(1, micro + 1) if (batch_size // world) % m == 0), default=0)
    if micro >= 1:
        fixes.append(f"--micro_batch_size {micro} ({gb(total(micro))})")
    for ac in dict.fromkeys([activation_checkpointing, True]):  # the fewest GPUs to shard over, if need be
        gpus = next((n for n in (2 ** k for k in range(11)) if total(world=n, fsdp=True,
                                                                     activation_checkpointing=ac) <= capacity), None)
        if gpus and not fixes:
            flags = "--fsdp" + (" --activation_checkpointing" if ac and not activation_checkpointing else "")
            fixes.append(f"{flags} on {_gpus(gpus)} "
                         f"({gb(total(world=gpus, fsdp=True, activation_checkpointing=ac))} each)")
    parts = ", ".join(f"{part} {gb(estimate[part])}" for part in ("weights", "gradients", "optimizer", "activations"))
    return (f"this run cannot fit: {estimate['parameters'] / 1e9:.2f}B parameters, {_setup(**setup)}, need about "
            f"{gb(estimate['total'])} a GPU ({parts}; {micro_batch_size} images of {config.block_size} tokens a "
            f"micro-batch) but it has {gb(capacity)}; "
            + ("try " + ", or ".join(fixes) if fixes else "none of --fsdp, --activation_checkpointing and "
               "--micro_batch_size makes it fit"))
