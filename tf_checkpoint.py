"""
TensorFlow tensor-bundle checkpoints, the format of the original Image GPT release, read with NumPy alone.

A tensor bundle is PREFIX.index plus data shards PREFIX.data-SSSSS-of-NNNNN. It is read here with NumPy alone (no
TensorFlow): the .index file is a LevelDB-format table mapping each variable's name to a protobuf record (dtype,
shape, which .data shard, offset, size, crc32c), and each tensor is read by seeking to its bytes and checked
against its crc32c. TFCheckpoint reads the index when opened and a tensor only when asked for it by name.
"""
import math
import os
import re
from collections import namedtuple

import numpy as np

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
