"""
Bring the released Image GPT weights into igpt.py's checkpoint format, and move weights to and from Hugging Face.

    python convert.py path/to/model.ckpt-1000000 --out igpt_s.pt --palette kmeans_centers.npy   # original TF files
    python convert.py --download s --step 1000000 --dir release --palette                       # fetch, then convert
    python convert.py --hf path/to/imagegpt-small --out igpt_s.pt                               # a local HF folder
    python convert.py --to_hf igpt_s.pt --out imagegpt-small                                    # ours -> HF folder

The original release is a TensorFlow "tensor bundle" checkpoint. It is read here with NumPy alone (no TensorFlow):
the .index file is a LevelDB-format table mapping each variable's name to a protobuf record (dtype, shape, which
.data shard, offset, size, crc32c), and each tensor is read by seeking to its bytes and checked against its crc32c.
Only the model's variables are read; optimizer slots and global_step are skipped. tf_to_igpt maps the original
variable layout onto igpt.py's modules and infers the config from the shapes.
"""
import argparse
import importlib
import json
import math
import os
import re
import time
from collections import namedtuple

import numpy as np
import torch

from igpt import IGPT, IGPTConfig, save_checkpoint
from common import log
from quantize import fetch, load_palette

BASE_URL = "https://openaipublic.blob.core.windows.net/image-gpt"
STEPS = (131000, 262000, 524000, 1000000)  # the released training steps
SPLITS = ("trX", "trY", "vaX", "vaY", "teX", "teY")

# ---- crc32c (Castagnoli), vectorised with NumPy ----
# A CRC register is linear over GF(2): the register after a message started from register r equals (r carried
# across as many zero bytes) xor (the register after the same message started from 0). So the data is cut into
# many lanes that all run at once from 0, a 4-byte word per step, and the lanes are then folded pairwise, each
# left lane carried across its right neighbour's length. "Carry across n zero bytes" is a 32x32 bit matrix, kept
# as four 256-entry tables, one per byte of the register.

LANE_WORDS = 64              # 4-byte words per lane
LANES = 1 << 16              # lanes per block, so a block is 16 MB


def _byte_table():
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(0x82F63B78), t >> 1)
    return t


_T = [_byte_table()]
for _ in range(3):  # _T[k][b]: byte b followed by k more bytes (slice-by-4)
    _T.append((_T[-1] >> 8) ^ _T[0][_T[-1] & 0xFF])
_u16 = np.arange(1 << 16, dtype=np.uint32)
_LO16 = _T[3][_u16 & 0xFF] ^ _T[2][_u16 >> 8]  # a whole word in two lookups: its low and high 16 bits
_HI16 = _T[1][_u16 & 0xFF] ^ _T[0][_u16 >> 8]


def _apply(m, x):
    return m[0][x & 0xFF] ^ m[1][(x >> 8) & 0xFF] ^ m[2][(x >> 16) & 0xFF] ^ m[3][x >> 24]


def _matrix(f):
    """The tables of a linear map on uint32 values, from its images of the 32 unit vectors."""
    cols = f(np.uint32(1) << np.arange(32, dtype=np.uint32))
    bits = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)
    return np.stack([np.bitwise_xor.reduce(np.where(bits, cols[8 * k:8 * k + 8], np.uint32(0)), axis=1)
                     for k in range(4)])


_ZEROS = [_matrix(lambda x: _T[0][x & 0xFF] ^ (x >> 8))]  # _ZEROS[k] carries a register across 2**k zero bytes


def _carry(x, n):
    """Registers x carried across n zero bytes."""
    k = 0
    while n >> k:
        if k == len(_ZEROS):
            _ZEROS.append(_matrix(lambda y: _apply(_ZEROS[-1], _apply(_ZEROS[-1], y))))
        if (n >> k) & 1:
            x = _apply(_ZEROS[k], x)
        k += 1
    return x


def _crc_from_zero(block):
    """The register after a uint8 block, started from 0, with all lanes at once."""
    lane = 4 * LANE_WORDS
    # Zeros in front leave a register that starts at 0 unchanged, so they pad the block to whole lanes.
    if len(block) % lane:
        block = np.concatenate([np.zeros(-len(block) % lane, np.uint8), block])
    words = np.ascontiguousarray(block.view("<u4").reshape(-1, LANE_WORDS).T)  # [step, lane]
    crc = np.zeros(words.shape[1], np.uint32)
    for w in words:
        c = crc ^ w
        crc = _LO16[c & 0xFFFF] ^ _HI16[c >> 16]
    while len(crc) > 1:
        if len(crc) % 2:  # a zero lane in front changes nothing, as above
            crc = np.concatenate([np.zeros(1, np.uint32), crc])
        crc = _carry(crc[0::2], lane) ^ crc[1::2]
        lane *= 2
    return crc[0]


def crc32c(data) -> int:
    """crc32c of a bytes-like object or contiguous array (as iSCSI, LevelDB and TensorFlow use it)."""
    buf = np.frombuffer(data, np.uint8)
    reg = np.uint32(0xFFFFFFFF)
    for start in range(0, len(buf), 4 * LANE_WORDS * LANES):
        block = buf[start:start + 4 * LANE_WORDS * LANES]
        reg = _carry(reg, len(block)) ^ _crc_from_zero(block)
    return int(reg ^ np.uint32(0xFFFFFFFF))


def _masked(crc):
    """The masked form TensorFlow and LevelDB store (so that a crc of data holding crcs stays well-mixed)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ---- TensorFlow tensor bundles: PREFIX.index (a LevelDB table of protobuf records) + PREFIX.data-*-of-* ----

TABLE_MAGIC = 0xDB4775248B80FB57
DTYPES = {1: "f4", 2: "f8", 3: "i4", 4: "u1", 5: "i2", 6: "i1", 9: "i8", 10: "?", 14: "bfloat16", 17: "u2",
          19: "f2", 22: "u4", 23: "u8"}  # TF DataType enum -> NumPy
Entry = namedtuple("Entry", "dtype shape shard offset size crc32c sliced")


def _varint(buf, pos):
    """The little-endian base-128 integer at buf[pos:], and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if b < 0x80:
            return value, pos


def _proto(buf):
    """A protobuf message as {field number: [values]}: ints for varint and fixed-size fields, bytes otherwise."""
    fields, pos = {}, 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, pos = int.from_bytes(buf[pos:pos + n], "little"), pos + n
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        else:
            raise ValueError(f"protobuf wire type {wire} is not used by checkpoints")
        fields.setdefault(tag >> 3, []).append(value)
    return fields


def _field(fields, number):
    """A scalar field of a decoded message: 0 when absent, the last value when repeated (as protobuf reads it)."""
    return fields.get(number, [0])[-1]


def _block(buf, handle, path):
    """A table block's contents, given its handle (two varints: offset, size), checked against its trailer."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    end = offset + size
    if end + 5 > len(buf):
        raise ValueError(f"{path} is truncated: a block ends at byte {end + 5} of {len(buf)}")
    if _masked(crc32c(buf[offset:end + 1])) != int.from_bytes(buf[end + 1:end + 5], "little"):
        raise ValueError(f"{path} is corrupt: the block at byte {offset} fails its crc32c")
    if buf[end] != 0:
        raise ValueError(f"{path} has a compressed block (type {buf[end]}); TensorFlow writes checkpoint indexes "
                         "uncompressed")
    return buf[offset:end]


def _block_items(block):
    """The (key, value) pairs of a block. Keys are prefix-compressed; the restart array at the end is not needed
    when walking from the start."""
    n_restarts = int.from_bytes(block[-4:], "little")
    end, pos, key = len(block) - 4 - 4 * n_restarts, 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        n, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + n]
        pos += n


class TFCheckpoint:
    """A TensorFlow tensor-bundle checkpoint (PREFIX.index plus PREFIX.data-SSSSS-of-NNNNN), read lazily by name.

        ckpt = TFCheckpoint("model.ckpt-1000000")
        ckpt.entries["model/wte"].shape          # (512, 512), from the index alone
        wte = ckpt.read("model/wte")             # a NumPy array, checked against its crc32c
    """

    def __init__(self, prefix):
        self.prefix = re.sub(r"\.(index|meta|data-\d{5}-of-\d{5})$", "", str(prefix))
        index = self.prefix + ".index"
        if not os.path.isfile(index):
            raise FileNotFoundError(f"no TensorFlow checkpoint at {str(prefix)!r}: {index} does not exist")
        with open(index, "rb") as f:
            buf = f.read()
        if len(buf) < 48 or int.from_bytes(buf[-8:], "little") != TABLE_MAGIC:
            raise ValueError(f"{index} is not a TensorFlow checkpoint index (no table magic number at its end)")
        pos = len(buf) - 48  # the footer: the metaindex handle (of an empty block), then the index handle
        for _ in range(2):
            _, pos = _varint(buf, pos)
        items = {}
        for _, handle in _block_items(_block(buf, buf[pos:], index)):
            items.update(_block_items(_block(buf, handle, index)))
        header = _proto(items.pop(b"", b""))
        self.num_shards = _field(header, 1)
        self.byteorder = ">" if _field(header, 2) == 1 else "<"
        self.entries = {}
        for key, value in items.items():
            e = _proto(value)
            dims = _proto(e[2][-1]).get(2, []) if 2 in e else []
            shape = tuple(_field(_proto(d), 1) for d in dims)
            self.entries[key.decode("utf-8", "backslashreplace")] = Entry(
                _field(e, 1), shape, _field(e, 3), _field(e, 4), _field(e, 5), _field(e, 6), 7 in e)

    def entry(self, name) -> Entry:
        """The index's record of tensor name: dtype, shape, shard, offset, size, crc32c."""
        if name not in self.entries:
            raise KeyError(f"{name!r} is missing from checkpoint {self.prefix}")
        if self.entries[name].sliced:
            raise ValueError(f"{name!r} in {self.prefix} is a partitioned variable (saved as slices), which this "
                             "reader does not support")
        return self.entries[name]

    def shard_path(self, shard):
        """The data file holding shard number `shard`."""
        return f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}"

    def read(self, name) -> np.ndarray:
        """The tensor called name (bfloat16 comes back as float32), after checking its bytes' crc32c."""
        e = self.entry(name)
        if e.dtype not in DTYPES:
            raise ValueError(f"{name!r} in {self.prefix} has TensorFlow dtype {e.dtype}, which this reader does "
                             "not support")
        bf16 = DTYPES[e.dtype] == "bfloat16"
        dtype = np.dtype("u2" if bf16 else DTYPES[e.dtype]).newbyteorder(self.byteorder)
        if e.size != math.prod(e.shape) * dtype.itemsize:
            raise ValueError(f"{name!r} in {self.prefix} has {e.size} bytes, not what shape {e.shape} of {dtype} "
                             "needs")
        path = self.shard_path(e.shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name!r} lies in data shard {path}, which does not exist")
        buf = np.empty(e.size, np.uint8)
        with open(path, "rb") as f:
            f.seek(e.offset)
            got = f.readinto(buf)
        if got != e.size:
            raise ValueError(f"{path} is truncated: {name!r} needs bytes {e.offset}..{e.offset + e.size} but the "
                             f"file has {os.path.getsize(path)} bytes")
        if _masked(crc32c(buf)) != e.crc32c:
            raise ValueError(f"{name!r} in {path} fails its crc32c check: the file is corrupt (download it again)")
        a = buf.view(dtype).reshape(e.shape).astype(dtype.newbyteorder("="), copy=False)
        return (a.astype(np.uint32) << 16).view(np.float32) if bf16 else a  # bfloat16 is float32's top half


# ---- the original variables -> igpt.py ----

def tf_config(ckpt) -> IGPTConfig:
    """The IGPTConfig of an original checkpoint (a TFCheckpoint), inferred from its variables' shapes."""
    n_vocab, n_embd = ckpt.entry("model/wte").shape
    n_ctx = ckpt.entry("model/wpe").shape[0]
    n_px = math.isqrt(n_ctx)
    if n_px * n_px != n_ctx:
        raise ValueError(f"'model/wpe' in {ckpt.prefix} has {n_ctx} positions, not a square number of pixels")
    layers = [int(m.group(1)) for n in ckpt.entries if (m := re.match(r"model/h(\d+)/", n))]
    n_head = ckpt.entry("model/h0/attn/q_proj").shape[0]
    n_classes = ckpt.entry("model/clf/wclf").shape[0] if "model/clf/wclf" in ckpt.entries else 0
    return IGPTConfig(n_px=n_px, n_vocab=n_vocab, n_embd=n_embd, n_head=n_head, n_layer=max(layers) + 1,
                      n_classes=n_classes)


def tf_to_igpt(ckpt, verbose=True) -> IGPT:
    """An IGPT holding the model/ variables of an original TF checkpoint (a TFCheckpoint). Optimizer slots,
    global_step and anything outside model/ are never read. verbose prints progress to stderr."""
    c = tf_config(ckpt)
    d, hd, V = c.n_embd, c.n_embd // c.n_head, c.n_vocab

    def same(a):
        return a

    def linear(a):  # the original computes x @ w with w [in, out]; nn.Linear keeps [out, in]
        return a.T

    # our key -> (original names, the shape each must have, how to make ours from them)
    plan = {"wte.weight": (["model/wte"], (V, d), same),
            "wpe.weight": (["model/wpe"], (c.block_size, d), same),
            "sos": (["model/sos"], (d,), same),
            "ln_f.g": (["model/ln_f/g"], (d,), same),
            "wtet.weight": (["model/wtet"], (V, d), same)}  # logits = h @ wtet.T, as nn.Linear computes
    if c.n_classes:
        plan["clf.weight"] = (["model/clf/wclf"], (c.n_classes, d), same)  # also h_mean @ wclf.T
    for i in range(c.n_layer):
        p = f"model/h{i}/"
        plan[f"h.{i}.ln_1.g"] = ([p + "ln_1/g"], (d,), same)
        plan[f"h.{i}.ln_2.g"] = ([p + "ln_2/g"], (d,), same)
        # q[b,h,s,e] = sum_f x[b,s,f] wq[h,e,f], so wq reshaped to [h*hd + e, f] is already an nn.Linear weight.
        plan[f"h.{i}.attn.c_attn.weight"] = ([p + f"attn/{n}_proj" for n in "qkv"], (c.n_head, hd, d),
                                             lambda q, k, v: np.concatenate([q, k, v]).reshape(3 * d, d))
        # y[b,s,f] = sum_{h,e} a[b,h,s,e] wc[h,e,f]: wc reshaped is [in, out].
        plan[f"h.{i}.attn.c_proj.weight"] = ([p + "attn/c_proj"], (c.n_head, hd, d), lambda w: w.reshape(d, d).T)
        plan[f"h.{i}.mlp.c_fc.weight"] = ([p + "mlp/c_fc/w"], (d, 4 * d), linear)
        plan[f"h.{i}.mlp.c_proj.weight"] = ([p + "mlp/c_proj/w"], (4 * d, d), linear)

    for names, shape, _ in plan.values():  # every check before the first byte of data is read
        for name in names:
            if ckpt.entry(name).shape != shape:
                raise ValueError(f"{name!r} in {ckpt.prefix} has shape {ckpt.entry(name).shape}, expected {shape}")
    names = sorted((n for ns, _, _ in plan.values() for n in ns),
                   key=lambda n: (ckpt.entries[n].shard, ckpt.entries[n].offset))  # sequential reads
    arrays, nbytes, t0 = {}, 0, time.time()
    for i, name in enumerate(names, 1):
        arrays[name] = ckpt.read(name)
        nbytes += ckpt.entries[name].size
        if verbose:
            rate = nbytes / 1e6 / max(time.time() - t0, 1e-9)
            shard = os.path.basename(ckpt.shard_path(ckpt.entries[name].shard))
            log(f"\rread {i}/{len(names)} tensors, {nbytes / 1e6:.1f} MB, {rate:.0f} MB/s, {shard}", end="")
    if verbose:
        log("")
    state = {k: torch.from_numpy(np.ascontiguousarray(fn(*(arrays.pop(n) for n in ns)), dtype=np.float32))
             for k, (ns, _, fn) in plan.items()}
    return IGPT.from_state_dict(c, state).eval()


# ---- Hugging Face ImageGPT (transformers' ImageGPTForCausalImageModeling) ----
# Differences from ours: wte has an extra last row, the SOS token, which is our `sos` (HF feeds it as input id
# vocab_size-1 at position 0); lm_head is our wtet; the layers are GPT-2 Conv1D (weight [in, out], with biases
# that the original model does not have); the norm is the same mean-free one.

def _require(module):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"Hugging Face interop needs {module}: pip install {module}") from e


def hf_to_igpt(folder) -> IGPT:
    """An IGPT from a local Hugging Face ImageGPT folder: config.json plus model.safetensors or pytorch_model.bin
    (e.g. a copy of openai/imagegpt-small)."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    for key, want in [("activation_function", "quick_gelu"), ("layer_norm_epsilon", 1e-5),
                      ("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)]:
        if cfg.get(key, want) != want:
            raise ValueError(f"{folder}/config.json has {key}={cfg[key]!r}; igpt's model needs {want!r}")
    d, n_pos, V = cfg["n_embd"], cfg["n_positions"], cfg["vocab_size"] - 1
    if cfg.get("n_inner") not in (None, 4 * d):
        raise ValueError(f"{folder}/config.json has n_inner={cfg['n_inner']}; igpt's MLP is 4 * n_embd wide")
    if math.isqrt(n_pos) ** 2 != n_pos:
        raise ValueError(f"{folder}/config.json has n_positions={n_pos}, not a square number of pixels")
    config = IGPTConfig(n_px=math.isqrt(n_pos), n_vocab=V, n_embd=d, n_head=cfg["n_head"], n_layer=cfg["n_layer"])

    path = os.path.join(folder, "model.safetensors")
    if os.path.isfile(path):
        hf = _require("safetensors.torch").load_file(path)
    elif os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        hf = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()
          if not re.search(r"\.attn\.(masked_)?bias$", k)}  # causal-mask buffers that older versions saved
    for k, v in hf.items():
        if k.endswith(".bias") and v.any():
            raise ValueError(f"{k} in {folder} is non-zero; igpt's model has no biases, so it cannot hold it")

    def take(k):
        if k not in hf:
            raise KeyError(f"{k} is missing from {folder}")
        return hf.pop(k).float()

    wte = take("wte.weight")
    if wte.shape[0] != V + 1:
        raise ValueError(f"wte.weight in {folder} has {wte.shape[0]} rows; config.json says vocab_size={V + 1}")
    state = {"wte.weight": wte[:V], "sos": wte[V], "wpe.weight": take("wpe.weight"),
             "ln_f.g": take("ln_f.weight"), "wtet.weight": take("lm_head.weight")}
    for i in range(config.n_layer):
        p = f"h.{i}."
        state[p + "ln_1.g"] = take(p + "ln_1.weight")
        state[p + "ln_2.g"] = take(p + "ln_2.weight")
        for k in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            state[f"{p}{k}.weight"] = take(f"{p}{k}.weight").T.contiguous()  # Conv1D [in, out] -> [out, in]
            hf.pop(f"{p}{k}.bias", None)
    if hf:
        raise ValueError(f"{folder} has weights igpt's model has no place for: {sorted(hf)}")
    return IGPT.from_state_dict(config, state).eval()


def igpt_to_hf(model, folder, force=False):
    """Write model as a Hugging Face ImageGPT folder (config.json + model.safetensors) that
    transformers.ImageGPTForCausalImageModeling.from_pretrained loads. The classifier head, if any, is left out."""
    transformers, save_file = _require("transformers"), _require("safetensors.torch").save_file
    path = os.path.join(folder, "model.safetensors")
    _refuse_overwrite(path, force)
    c = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    hf = {"transformer.wte.weight": torch.cat([sd["wte.weight"], sd["sos"][None]]),
          "transformer.wpe.weight": sd["wpe.weight"], "transformer.ln_f.weight": sd["ln_f.g"],
          "lm_head.weight": sd["wtet.weight"]}
    for i in range(c.n_layer):
        p = f"h.{i}."
        hf[f"transformer.{p}ln_1.weight"] = sd[p + "ln_1.g"]
        hf[f"transformer.{p}ln_2.weight"] = sd[p + "ln_2.g"]
        for k in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            w = sd[f"{p}{k}.weight"]
            hf[f"transformer.{p}{k}.weight"] = w.T
            hf[f"transformer.{p}{k}.bias"] = torch.zeros(w.shape[0])
    config = transformers.ImageGPTConfig(
        vocab_size=c.n_vocab + 1, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        activation_function="quick_gelu", layer_norm_epsilon=1e-5, tie_word_embeddings=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # the original trains without dropout
        architectures=["ImageGPTForCausalImageModeling"])
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in hf.items()}, path, metadata={"format": "pt"})


# ---- downloading the release (quantize.fetch: resumable, urllib only) ----

def download_release(model, step, folder, palette=False, dataset=None, base_url=BASE_URL):
    """Fetch the released checkpoint of size model ("s", "m", "l") at training step into folder, with the palette
    (kmeans_centers.npy) and a dataset's six .npy files if asked; the .meta graph is not needed and not fetched.
    Returns the checkpoint prefix."""
    os.makedirs(folder, exist_ok=True)
    name = f"model.ckpt-{step}"
    prefix, url = os.path.join(folder, name), f"{base_url}/checkpoints/igpt-{model}/{step}/{name}"
    fetch(url + ".index", prefix + ".index")
    ckpt = TFCheckpoint(prefix)  # the index says how many data shards there are
    for i in range(ckpt.num_shards):
        fetch(url + ckpt.shard_path(i)[len(prefix):], ckpt.shard_path(i))
    if palette:
        fetch(f"{base_url}/color-clusters/kmeans_centers.npy", os.path.join(folder, "kmeans_centers.npy"))
    for split in SPLITS if dataset else ():
        fetch(f"{base_url}/datasets/{dataset}_{split}.npy", os.path.join(folder, f"{dataset}_{split}.npy"))
    return prefix


def _refuse_overwrite(path, force):
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")


def main(argv=None):
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("checkpoint", nargs="?", default=None, help="an original TF checkpoint prefix to convert")
    parser.add_argument("--out", default=None, help="the .pt to write (with --to_hf: the folder); with --download "
                        "it defaults to DIR/igpt-SIZE-STEP.pt")
    parser.add_argument("--palette", nargs="?", const=True, default=None, metavar="NPY",
                        help="a palette .npy [n_vocab, 3] to store in the checkpoint; with --download and no NPY, "
                        "the release's kmeans_centers.npy is fetched")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument("--download", choices=["s", "m", "l"], default=None,
                        help="fetch this released model size, then convert it")
    parser.add_argument("--step", type=int, choices=STEPS, default=1000000,
                        help="with --download: the training step of the checkpoint")
    parser.add_argument("--dir", default="release", help="with --download: where the files go")
    parser.add_argument("--dataset", choices=["imagenet", "cifar10"], default=None,
                        help="with --download: also fetch this colour-quantised dataset")
    parser.add_argument("--base_url", default=BASE_URL, help="with --download: where the release lives")
    parser.add_argument("--hf", default=None, metavar="FOLDER", help="import a Hugging Face ImageGPT folder")
    parser.add_argument("--to_hf", default=None, metavar="PT", help="export this checkpoint of ours to a Hugging "
                        "Face ImageGPT folder --out")
    args = parser.parse_args(argv)
    sources = [x for x in (args.checkpoint, args.download, args.hf, args.to_hf) if x is not None]
    if len(sources) != 1:
        parser.error("give exactly one of: a TF checkpoint, --download, --hf, --to_hf")
    if args.download and args.out is None:
        args.out = os.path.join(args.dir, f"igpt-{args.download}-{args.step}.pt")
    if args.out is None:
        parser.error("--out is required")
    if args.palette is True and not args.download:
        parser.error("--palette needs a path unless --download fetches the release's")

    if args.to_hf:
        igpt_to_hf(IGPT.from_checkpoint(args.to_hf), args.out, args.force)
        log(f"wrote {args.out}")
        return
    _refuse_overwrite(args.out, args.force)  # before hours of downloading
    palette = load_palette(args.palette) if isinstance(args.palette, str) else None
    if args.download:
        prefix = download_release(args.download, args.step, args.dir, args.palette is True, args.dataset,
                                  args.base_url)
        if args.palette is True:
            palette = load_palette(os.path.join(args.dir, "kmeans_centers.npy"))
        model = tf_to_igpt(TFCheckpoint(prefix))
    elif args.hf:
        model = hf_to_igpt(args.hf)
    else:
        model = tf_to_igpt(TFCheckpoint(args.checkpoint))
    if palette is not None and len(palette) != model.config.n_vocab:
        raise ValueError(f"the palette has {len(palette)} colours but the model has n_vocab={model.config.n_vocab}")
    save_checkpoint(args.out, model, palette=palette)
    log(f"wrote {args.out}: {model.get_num_params() / 1e6:.1f}M parameters, {model.config}")


if __name__ == "__main__":
    main()
