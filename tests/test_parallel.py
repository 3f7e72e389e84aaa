"""parallel.py: activation checkpointing, sharded checkpoints (atomic, safe to read), the memory estimate."""
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

import igpt
import parallel
from igpt import IGPTConfig
from tiny import TINY, tiny_model, tokens


def grads_and_loss(model, x):
    loss = model(x)[1]
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_checkpointed_blocks_give_the_same_loss_and_gradients_and_keep_their_names():
    plain, checkpointed = tiny_model(), tiny_model()
    parallel.checkpoint_blocks(checkpointed)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    assert type(checkpointed.h[0]).__name__ == "CheckpointWrapper"
    loss, grads = grads_and_loss(plain.train(), tokens())
    loss_ac, grads_ac = grads_and_loss(checkpointed.train(), tokens())
    assert loss_ac == pytest.approx(loss, rel=1e-6)
    for name, g in grads_ac.items():
        torch.testing.assert_close(g, grads[name.replace("_checkpoint_wrapped_module.", "")], rtol=1e-6, atol=1e-7)


def test_checkpointed_blocks_run_their_forward_again_in_the_backward(monkeypatch):
    calls, block_forward = [], igpt.Block.forward
    monkeypatch.setattr(igpt.Block, "forward", lambda self, *a, **k: calls.append(1) or block_forward(self, *a, **k))
    plain, checkpointed = tiny_model().train(), tiny_model().train()
    parallel.checkpoint_blocks(checkpointed)
    grads_and_loss(plain, tokens())
    assert len(calls) == plain.config.n_layer  # each block once
    grads_and_loss(checkpointed, tokens())
    assert len(calls) == 3 * plain.config.n_layer  # each block in the forward, and again in the backward


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # CPU autocast keeps the norm in bf16
def test_blocks_gathered_in_bf16_keep_the_residual_stream_in_fp32():
    model, dtypes = tiny_model().train(), []
    for block in model.h:
        block.register_forward_hook(lambda module, inputs, output: dtypes.extend([inputs[0].dtype, output.dtype]))
    try:
        parallel.shard(model, torch.device("cpu"), param_dtype=torch.bfloat16)  # a process group of one
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(tokens())[1].backward()
        assert dtypes == [torch.float32] * 4
        weight = model.h[0].attn.c_attn.weight
        assert isinstance(weight, torch.distributed.tensor.DTensor) and weight.grad.dtype == torch.float32
    finally:
        torch.distributed.destroy_process_group()


def test_under_ddp_the_gradients_are_views_into_its_bucket_not_a_second_copy():
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        model = parallel.replicate(tiny_model().train(), torch.device("cpu"))
        optimizer = model.module.configure_optimizers(1e-2)
        for step in range(3):
            model(tokens(seed=step))[1].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
        model(tokens(seed=3))[1].backward()
        grads = [p.grad for p in model.parameters()]
        storages = {g.untyped_storage().data_ptr() for g in grads}
        assert len(storages) == 1  # the tiny model's gradients fit one bucket
        assert grads[0].untyped_storage().nbytes() == sum(g.nbytes for g in grads)
    finally:
        torch.distributed.destroy_process_group()


# ---- sharded checkpoints (one process: DCP runs without a process group) ----

def trained(seed):
    """A tiny model and its AdamW after one step, so the optimizer has state."""
    model = tiny_model(seed).train()
    optimizer = model.configure_optimizers(1e-2)
    model(tokens(seed=seed))[1].backward()
    optimizer.step()
    return model, optimizer


def test_a_sharded_checkpoint_reads_back_the_weights_the_optimizer_and_the_train_state(tmp_path):
    model, optimizer = trained(0)
    palette = torch.rand(16, 3) * 2 - 1
    parallel.save_sharded(str(tmp_path / "ckpt.dcp"), model, optimizer, palette=palette, step=7)
    fresh, fresh_opt = trained(1)
    parallel.load_sharded(str(tmp_path / "ckpt.dcp"), fresh, fresh_opt)
    torch.testing.assert_close(fresh.state_dict(), model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(fresh_opt.state_dict(), optimizer.state_dict(), rtol=0, atol=0)
    state = parallel.read_train_state(str(tmp_path / "ckpt.dcp"))
    assert state["step"] == 7 and state["config"] == IGPTConfig(**TINY).__dict__
    torch.testing.assert_close(state["palette"], palette)
    weights = parallel.load_weights(str(tmp_path / "ckpt.dcp"))
    torch.testing.assert_close(weights["model"], model.state_dict(), rtol=0, atol=0)


def test_a_sharded_checkpoints_train_state_is_verified_as_a_pt_checkpoint_is(tmp_path):
    model, optimizer = trained(0)
    parallel.save_sharded(str(tmp_path / "ckpt.dcp"), model, optimizer, step=7)
    file = tmp_path / "ckpt.dcp" / parallel.TRAIN_STATE
    damaged = bytearray(file.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    file.write_bytes(damaged)
    with pytest.raises(ValueError, match=f"{parallel.TRAIN_STATE}' is corrupt: .* changed since it was written"):
        parallel.read_train_state(str(tmp_path / "ckpt.dcp"))


@pytest.mark.parametrize("where", ["writing", "renaming"])
def test_a_run_killed_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    path = str(tmp_path / "ckpt.dcp")
    before, optimizer = trained(0)
    parallel.save_sharded(path, before, optimizer, step=1)
    after, optimizer = trained(1)
    if where == "writing":  # the shards are being written
        monkeypatch.setattr(parallel.dcp, "save", lambda *a, **k: (os.makedirs(path + ".tmp"), 1 / 0))
    else:  # between moving the old folder aside and the new one into place
        real_replace = os.replace
        monkeypatch.setattr(parallel.os, "replace",
                            lambda src, dst: real_replace(src, dst) if dst.endswith(".old") else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        parallel.save_sharded(path, after, optimizer, step=2)
    monkeypatch.undo()
    found = parallel.find_checkpoint(str(tmp_path))
    assert parallel.read_train_state(found)["step"] == 1
    torch.testing.assert_close(parallel.load_weights(found)["model"], before.state_dict(), rtol=0, atol=0)
    parallel.save_sharded(path, after, optimizer, step=2)  # the next save cleans up
    assert sorted(os.listdir(tmp_path)) == ["ckpt.dcp"] and parallel.read_train_state(path)["step"] == 2


def make_file(path):
    open(path, "w").close()


class Trap:
    """Unpickled, it would create a file: what a checkpoint must never be able to do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return make_file, (self.path,)


def test_a_sharded_checkpoint_whose_metadata_would_run_code_is_refused(tmp_path):
    model, optimizer = trained(0)
    parallel.save_sharded(str(tmp_path / "ckpt.dcp"), model, optimizer)
    with open(tmp_path / "ckpt.dcp" / ".metadata", "wb") as f:
        pickle.dump(Trap(str(tmp_path / "ran")), f)
    with pytest.raises(ValueError, match="refused: .*make_file has no place"):
        parallel.load_weights(str(tmp_path / "ckpt.dcp"))
    assert not (tmp_path / "ran").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_entry_that_would_run_code_is_refused(tmp_path):
    model, optimizer = trained(0)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    optimizer_state["param_groups"][0]["lr"] = Trap(str(tmp_path / "ran"))  # the settings are pickled entries
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp_path / "ckpt.dcp"))
    with pytest.raises(ValueError, match=r"entry 'optimizer.param_groups.0.lr' is refused: it is more than"):
        parallel.load_sharded(str(tmp_path / "ckpt.dcp"), *trained(1))
    assert not (tmp_path / "ran").exists()


def test_a_folder_without_a_finished_save_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "ckpt.dcp")
    with pytest.raises(ValueError, match="has no train_state.pt"):
        parallel.load_weights(str(tmp_path / "ckpt.dcp"))


def test_find_checkpoint_takes_the_newer_of_the_two_kinds(tmp_path):
    assert parallel.find_checkpoint(str(tmp_path)) is None
    (tmp_path / "ckpt.pt").write_bytes(b"")
    os.makedirs(tmp_path / "ckpt.dcp")
    os.utime(tmp_path / "ckpt.pt", (0, 0))
    assert parallel.find_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt.dcp")


# ---- the memory estimate ----

def counts(d, L, V, T):
    """Parameters of a block and of the rest (embeddings wte and wpe, the head wtet, sos, ln_f's gain)."""
    return 12 * d * d + 2 * d, 2 * V * d + T * d + 2 * d


def test_memory_estimate_of_igpt_s_on_one_gpu_matches_a_hand_computation():
    block, rest = counts(512, 24, 512, 1024)
    n = 24 * block + rest
    got = parallel.memory_estimate(IGPTConfig.preset("s"), micro_batch_size=32)
    # fp32 weights and autocast's bf16 copies; fp32 gradients; two fp32 moments; 38 bytes per token and width
    # kept by each block, the final norm's 4 + 2, the logits' 2 + 4 + 4 bytes per token and colour
    activations = 32 * 1024 * (24 * 38 * 512 + 6 * 512 + 10 * 512)
    assert got == {"parameters": n, "weights": 6 * n, "gradients": 4 * n, "optimizer": 8 * n,
                   "activations": activations, "total": 18 * n + activations}
    assert n == 76_571_648


def test_memory_estimate_of_igpt_xl_sharded_over_8_gpus_matches_a_hand_computation():
    block, rest = counts(3072, 60, 512, 4096)
    n = 60 * block + rest
    got = parallel.memory_estimate(IGPTConfig.preset("xl", n_px=64), micro_batch_size=4, world=8, fsdp=True,
                                   activation_checkpointing=True)
    weights = 4 * n / 8 + 2 * 2 * block + 4 * rest  # a shard; two blocks gathered in bf16; the rest in fp32
    gradients = 4 * n / 8 + 2 * (2 + 4) * block + 4 * rest  # a shard; two blocks' whole gradients, bf16 and fp32
    activations = 4 * 4096 * ((4 * 60 + 38) * 3072 + 6 * 3072 + 10 * 512)  # each block's input; one block inside
    assert got == pytest.approx({"parameters": n, "weights": weights, "gradients": gradients, "optimizer": n,
                                 "activations": activations, "total": weights + gradients + n + activations})
    assert round(n / 1e9, 2) == 6.81


def test_ddp_of_igpt_xl_on_80_gb_is_refused_with_the_numbers_and_a_setup_that_fits():
    xl = IGPTConfig.preset("xl")
    error = parallel.fit_error(xl, 80e9, micro_batch_size=8, world=8)
    block, rest = counts(3072, 60, 512, 1024)
    n = 60 * block + rest
    # by hand, as for iGPT-S above: DDP keeps everything whole on each GPU
    parts = [6 * n, 4 * n, 8 * n, 8 * 1024 * (60 * 38 * 3072 + 6 * 3072 + 10 * 512)]
    weights, gradients, optimizer, activations = [f"{b / 1e9:.1f} GB" for b in parts]
    assert error.startswith(f"this run cannot fit: 6.80B parameters, DDP on 8 GPUs, need about {sum(parts) / 1e9:.1f}"
                            f" GB a GPU (weights {weights}, gradients {gradients}, optimizer {optimizer}, "
                            f"activations {activations}")
    assert error.endswith("but it has 80.0 GB; try --fsdp on 8 GPUs (73.0 GB each)")
    assert parallel.memory_estimate(xl, 8, world=4, fsdp=True)["total"] > 80e9  # 8 is the fewest
    assert parallel.fit_error(xl, 80e9, micro_batch_size=8, world=8, fsdp=True) is None


def test_the_micro_batch_suggested_divides_each_processs_share_of_the_batch():
    long = IGPTConfig.preset("l", n_px=64)
    largest = max(m for m in range(1, 33) if parallel.memory_estimate(long, m)["total"] <= 141e9)
    share = 12  # images a process, of a batch of 24 on 2
    expected = max(m for m in range(1, largest + 1) if share % m == 0)
    assert expected < largest  # else the batch would not matter
    error = parallel.fit_error(long, 141e9, micro_batch_size=32, world=2, batch_size=2 * share)
    assert f"--micro_batch_size {expected} (" in error


def test_a_run_short_of_activation_memory_is_told_the_largest_micro_batch_and_checkpointing():
    long = IGPTConfig.preset("l", n_px=64)
    error = parallel.fit_error(long, 141e9, micro_batch_size=32)
    fits = [m for m in range(1, 33) if parallel.memory_estimate(long, m)["total"] <= 141e9]
    ac = parallel.memory_estimate(long, 32, activation_checkpointing=True)["total"]
    assert error.endswith(f"try --activation_checkpointing ({ac / 1e9:.1f} GB), or --micro_batch_size {max(fits)} "
                          f"({parallel.memory_estimate(long, max(fits))['total'] / 1e9:.1f} GB)")
