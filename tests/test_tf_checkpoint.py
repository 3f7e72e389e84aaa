"""tf_checkpoint.py: crc32c, the index, every dtype, and clear errors for corrupt, truncated, missing, damaged or
partitioned checkpoints, all on the fixture TensorFlow wrote (tf_fixtures)."""
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tf_checkpoint
from common import USER_ERRORS
from convert import tf_to_igpt
from tf_checkpoint import TFCheckpoint, crc32c
from tf_fixtures import FIXTURES, GOLDEN, PREFIX


def copy_fixture(tmp_path):
    shutil.copytree(PREFIX.parent, tmp_path / "tf")
    return tmp_path / "tf" / PREFIX.name


# ---- crc32c and the table format ----

def crc32c_bitwise(data):
    """The definition, one bit at a time: reflected polynomial 0x82F63B78, init and final xor 0xFFFFFFFF."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_known_values():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    # RFC 3720 (iSCSI), appendix B.4
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


def test_crc32c_matches_the_definition_across_lane_and_block_boundaries(monkeypatch):
    monkeypatch.setattr(tf_checkpoint, "LANES", 3)  # blocks of 768 bytes, so a few KB cross several, with odd lanes
    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    for n in (1, 3, 4, 255, 256, 257, 767, 768, 769, 2 * 768, 5000):
        assert crc32c(data[:n]) == crc32c_bitwise(data[:n]), n
    assert crc32c(np.frombuffer(data, np.float32)) == crc32c_bitwise(data)  # any contiguous array, as raw bytes


def test_varint():
    cases = {b"\x00": 0, b"\x01": 1, b"\x7f": 127, b"\x80\x01": 128, b"\xac\x02": 300, b"\x80\x80\x01": 16384,
             b"\xff" * 9 + b"\x01": 2**64 - 1}
    for encoded, value in cases.items():
        assert tf_checkpoint._varint(b"\x05" + encoded + b"\x07", 1) == (value, 1 + len(encoded))
    with pytest.raises(ValueError, match="truncated varint"):
        tf_checkpoint._varint(b"\xac", 0)


def test_index_lists_every_variable_with_its_shard():
    ckpt = TFCheckpoint(PREFIX)
    assert ckpt.num_shards == 3
    assert ckpt.entries["model/h0/attn/q_proj"].shape == (2, 8, 16)
    assert ckpt.entries["global_step"].shape == ()
    assert {"model/wte/Adam", "model/wte/Adam_1", "beta1_power", "beta2_power"} <= set(ckpt.entries)
    assert len({e.shard for n, e in ckpt.entries.items() if n.startswith("model/")}) == 2  # sharded model
    assert len(ckpt.entries) == 3 * (5 + 1 + 2 * 8) + 3 + 4  # model with 2 slots each, step, beta powers, extra


def test_reads_the_dtypes_tensorflow_wrote():
    ckpt = TFCheckpoint(str(PREFIX) + ".index")  # the .index path names the same checkpoint
    for name, dtype in [("f16", np.float16), ("bf16", np.float32), ("i32", np.int32), ("i64", np.int64)]:
        a = ckpt.read(f"extra/{name}")
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, GOLDEN[name])
    assert ckpt.read("global_step") == 2  # two Adam steps were taken


# ---- damage ----

def test_a_corrupt_data_file_names_the_tensor_and_the_file(tmp_path):
    prefix = copy_fixture(tmp_path)
    ckpt = TFCheckpoint(prefix)
    e = ckpt.entries["model/wtet"]
    path = Path(ckpt.shard_path(e.shard))
    data = bytearray(path.read_bytes())
    data[e.offset + e.size // 2] ^= 0x10
    path.write_bytes(data)
    np.testing.assert_array_equal(ckpt.read("model/wte"), TFCheckpoint(PREFIX).read("model/wte"))  # neighbours intact
    with pytest.raises(ValueError, match=f"'model/wtet' in {path}.*crc32c"):
        tf_to_igpt(ckpt)


def test_a_truncated_data_file_is_a_clear_error(tmp_path):
    ckpt = TFCheckpoint(copy_fixture(tmp_path))
    e = ckpt.entries["model/ln_f/g"]
    path = ckpt.shard_path(e.shard)
    os.truncate(path, e.offset + 10)
    with pytest.raises(ValueError, match=f"{path} is truncated: 'model/ln_f/g' needs"):
        ckpt.read("model/ln_f/g")


def test_a_missing_shard_is_named(tmp_path):
    ckpt = TFCheckpoint(copy_fixture(tmp_path))
    os.remove(ckpt.shard_path(2))
    with pytest.raises(FileNotFoundError, match=r"model.ckpt-1000000.data-00002-of-00003, which does not exist"):
        tf_to_igpt(ckpt)


def test_a_wrong_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.ckpt-42"):
        TFCheckpoint(tmp_path / "model.ckpt-42")


def test_a_damaged_index_is_refused(tmp_path):
    prefix = copy_fixture(tmp_path)
    index = Path(str(prefix) + ".index")
    data = bytearray(index.read_bytes())
    data[40] ^= 0x01
    index.write_bytes(data)
    with pytest.raises(ValueError, match="corrupt: the block at byte 0 fails its crc32c"):
        TFCheckpoint(prefix)
    index.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="not a TensorFlow checkpoint index"):
        TFCheckpoint(prefix)


def test_partitioned_variables_are_refused():
    ckpt = TFCheckpoint(FIXTURES / "tf_partitioned" / "model.ckpt")
    with pytest.raises(ValueError, match="'model/wte' .* partitioned"):
        ckpt.read("model/wte")
    with pytest.raises(ValueError, match="'model/wte' .* partitioned"):
        tf_to_igpt(ckpt)


def test_random_corruptions_give_the_same_model_or_an_error_a_script_turns_into_one_line(tmp_path):
    prefix = copy_fixture(tmp_path)
    clean = tf_to_igpt(TFCheckpoint(prefix), verbose=False).state_dict()
    files = sorted(prefix.parent.iterdir())
    rng = random.Random(0)
    outcomes = {"same model": 0, "error": 0}
    for _ in range(60):  # a byte flipped or the file cut short, in any of the four files
        path = rng.choice(files)
        whole = path.read_bytes()
        damaged = bytearray(whole)
        if rng.random() < 0.8:
            damaged[rng.randrange(len(whole))] ^= 1 << rng.randrange(8)
        else:
            damaged = damaged[:rng.randrange(len(whole))]
        path.write_bytes(damaged)
        try:
            state = tf_to_igpt(TFCheckpoint(prefix), verbose=False).state_dict()
            assert all(torch.equal(state[k], clean[k]) for k in clean)  # the damage was in what is never read
            outcomes["same model"] += 1
        except USER_ERRORS:
            outcomes["error"] += 1
        path.write_bytes(whole)
    assert outcomes["same model"] > 0 and outcomes["error"] > 0  # both kinds of damage were met
