"""igpt.py, the model: shapes, the sos shift, causality, the loss, initialisation, checkpoints; the BERT objective:
bidirectionality, the mask, its loss (generation: test_generate.py)."""
import math
import random

import pytest
import torch

from igpt import IGPT, IGPTConfig, fixed_mask, generate, load_checkpoint, save_checkpoint
from tiny import TINY, tiny_model, tokens
from traps import CreatesAFile


def reference_logits(model, x, mask=None):
    """The original's math written out with explicit einsums and no torch modules; for BERT, mask [B, T] (True =
    masked) zeroes those token embeddings and attention sees every position."""
    c = model.config
    d, H = c.n_embd, c.n_head

    def norm(h, g):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * g

    B, T = x.shape
    if c.bert:
        h = model.wte.weight[x] * (~mask)[..., None].float() + model.wpe.weight[:T]
        mask = torch.ones(T, T).bool()
    else:
        h = torch.cat([model.sos.expand(B, 1, d), model.wte.weight[x[:, :-1]]], 1) + model.wpe.weight[:T]
        mask = torch.ones(T, T).tril().bool()
    for blk in model.h:
        a = norm(h, blk.ln_1.g)
        wq, wk, wv = blk.attn.c_attn.weight.view(3, H, d // H, d)
        q, k, v = (torch.einsum("bsf,hef->bhse", a, w) for w in (wq, wk, wv))
        w = (q @ k.transpose(-1, -2)) / math.sqrt(d // H)
        w = torch.where(mask, w, torch.tensor(-1e10)).softmax(-1)
        y = torch.einsum("bhse,fhe->bsf", w @ v, blk.attn.c_proj.weight.view(d, H, d // H))
        h = h + y
        m = norm(h, blk.ln_2.g) @ blk.mlp.c_fc.weight.T
        h = h + (m * torch.sigmoid(1.702 * m)) @ blk.mlp.c_proj.weight.T
    return norm(h, model.ln_f.g) @ model.wtet.weight.T


def test_presets_have_the_released_sizes():
    s = IGPTConfig.preset("s")
    assert (s.n_embd, s.n_head) == (512, 8)
    assert IGPTConfig.preset("m").n_layer == 36 and IGPTConfig.preset("l").n_head == 16
    with torch.device("meta"):  # shapes alone: no weights to draw
        n_s = IGPT(s).get_num_params()
    assert 75e6 < n_s < 78e6  # "76M"


def test_xl_preset_is_the_papers_largest_model_of_6_8_billion_parameters():
    c = IGPTConfig.preset("xl")
    assert (c.n_embd, c.n_layer) == (3072, 60)  # "L = 60 layers and ... an embedding size of d = 3072"
    with torch.device("meta"):
        assert round(IGPT(c).get_num_params() / 1e9, 1) == 6.8


@pytest.mark.parametrize("n_px", [32, 48, 64])
@pytest.mark.parametrize("size", ["s", "m", "l", "xl"])
def test_every_size_builds_for_long_contexts_with_the_parameters_counted_by_hand(size, n_px):
    c = IGPTConfig.preset(size, n_px=n_px)
    d, L, V, T = c.n_embd, c.n_layer, c.n_vocab, n_px * n_px
    by_hand = L * (4 * d * d + 8 * d * d + 2 * d) + 2 * V * d + T * d + 2 * d  # blocks, wte + wtet, wpe, sos + ln_f
    with torch.device("meta"):
        model = IGPT(c)
    assert model.wpe.weight.shape == (T, d) and model.get_num_params() == by_hand


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        IGPTConfig.preset("xxl")


def test_logits_match_the_original_math_written_out():
    model, x = tiny_model(), tokens()
    logits, _ = model(x)
    torch.testing.assert_close(logits, reference_logits(model, x), rtol=1e-5, atol=1e-5)


def test_first_position_sees_only_sos():
    model = tiny_model()
    a, b = tokens(seed=1), tokens(seed=2)
    torch.testing.assert_close(model(a)[0][:, 0], model(b)[0][:, 0])
    assert not torch.allclose(model(a)[0][:, 1], model(b)[0][:, 1])


def test_changing_token_j_leaves_positions_up_to_j_unchanged():
    model, x = tiny_model(), tokens()
    j = 7
    y = x.clone()
    y[:, j] = (y[:, j] + 1) % 16
    la, lb = model(x)[0], model(y)[0]
    torch.testing.assert_close(la[:, : j + 1], lb[:, : j + 1])
    assert not torch.allclose(la[:, j + 1], lb[:, j + 1])


def test_loss_is_mean_cross_entropy_in_nats():
    model, x = tiny_model(), tokens()
    logits, loss = model(x)
    logp = logits.log_softmax(-1)
    expected = -logp.gather(-1, x[..., None]).mean()
    torch.testing.assert_close(loss, expected)


def test_fresh_model_predicts_uniform_because_the_head_starts_at_zero():
    model = IGPT(IGPTConfig(**TINY))
    _, loss = model(tokens())
    assert loss.item() == pytest.approx(math.log(16), abs=1e-6)


def test_initialisation_scales_follow_the_original():
    torch.manual_seed(0)
    c = IGPTConfig(n_px=16, n_vocab=512, n_embd=256, n_head=4, n_layer=4)
    m = IGPT(c)
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.wpe.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert m.h[0].attn.c_attn.weight.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert m.h[0].attn.c_proj.weight.std().item() == pytest.approx(1 / 32, rel=0.05)
    assert m.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.sos.std().item() == pytest.approx(0.02, rel=0.15)  # 256 values
    assert all((norm.g == 1).all() for norm in [m.ln_f, *(n for b in m.h for n in (b.ln_1, b.ln_2))])
    assert (m.wtet.weight == 0).all()
    assert not any(isinstance(mod, torch.nn.Linear) and mod.bias is not None for mod in m.modules())


def test_classify_pools_the_final_features():
    model = tiny_model(n_classes=3)
    x = tokens()
    clf_logits, gen_loss = model.classify(x)
    expected = model.hidden(x).mean(1) @ model.clf.weight.T
    torch.testing.assert_close(clf_logits, expected)
    torch.testing.assert_close(gen_loss, model(x)[1])


def test_features_are_gainless_norm_of_the_residual_stream_averaged_over_positions():
    model, x = tiny_model(), tokens()
    with torch.no_grad():  # a residual stream whose mean square is near the norm's eps, so a wrong eps shows
        for w in [model.wte.weight, model.wpe.weight, model.sos, *(p for n, p in model.h.named_parameters()
                                                                    if n.endswith("c_proj.weight"))]:
            w.mul_(0.1)
    h = model.embed(x)
    expected = []
    for block in model.h:
        h = block(h)
        expected.append((h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).mean(1))
    feats = model.features(x, layers=[2, 1])
    torch.testing.assert_close(feats[:, 0], expected[1])
    torch.testing.assert_close(feats[:, 1], expected[0])


def test_features_reject_layers_out_of_range():
    with pytest.raises(ValueError, match="1..2"):
        tiny_model().features(tokens(), layers=[3])


def test_checkpoint_round_trip_keeps_weights_and_palette(tmp_path):
    model = tiny_model()
    palette = torch.rand(16, 3) * 2 - 1
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, palette=palette)
    loaded = IGPT.from_checkpoint(path)
    torch.testing.assert_close(loaded(tokens())[0], model(tokens())[0])
    torch.testing.assert_close(loaded.palette, palette)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind


def test_a_palette_of_another_size_than_the_vocabulary_is_not_saved(tmp_path):
    with pytest.raises(ValueError, match=r"not writing .*m.pt: the palette has 8 colours but the model has n_vocab=16"):
        save_checkpoint(tmp_path / "m.pt", tiny_model(), palette=torch.zeros(8, 3))
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    for content in (b"not a checkpoint", b"\x93NUMPY" + bytes(100)):
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=r"bad\.pt' is not an igpt checkpoint") as e:
            load_checkpoint(bad)
        assert "weights_only" not in str(e.value)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="convert.py"):
        load_checkpoint(tmp_path / "other.pt")


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"config": {}, "model": {}, "payload": CreatesAFile(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not an igpt checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def small_checkpoint(path):
    model = tiny_model(n_px=2, n_vocab=4, n_embd=4, n_head=1, n_layer=1)
    save_checkpoint(path, model, palette=torch.rand(4, 3) * 2 - 1, step=7)
    return model


def test_every_flipped_byte_of_a_checkpoint_is_detected_naming_the_file(tmp_path):
    small_checkpoint(tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    rng = random.Random(0)
    # a sample of the whole file (every byte of it in the lab notes), and all of the zip's end record and comment
    positions = sorted(set(rng.sample(range(len(data)), 300)) | set(range(len(data) - 60, len(data))))
    for i in positions:
        flipped = bytearray(data)
        flipped[i] ^= 1 << rng.randrange(8)
        (tmp_path / "flipped.pt").write_bytes(flipped)
        with pytest.raises(ValueError, match=r"flipped\.pt' is corrupt: ((tensor \S+|its .*|a part .*) changed|its zip "
                                             r"comment, which records the file's crc32, is damaged)"):
            load_checkpoint(tmp_path / "flipped.pt")


def test_a_changed_tensor_is_named(tmp_path):
    model = small_checkpoint(tmp_path / "m.pt")
    data = bytearray((tmp_path / "m.pt").read_bytes())
    at = data.index(model.wpe.weight.detach().numpy().tobytes())
    data[at + 5] ^= 0x10
    (tmp_path / "m.pt").write_bytes(data)
    with pytest.raises(ValueError, match=r"m\.pt' is corrupt: tensor model/wpe\.weight changed since it was written"):
        load_checkpoint(tmp_path / "m.pt")


def test_non_finite_weights_are_never_saved_and_refused_on_load(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not writing .*m\.pt: model/h\.1\.mlp\.c_fc\.weight holds inf or nan"):
        save_checkpoint(tmp_path / "m.pt", model)
    assert not list(tmp_path.iterdir())
    torch.save({"config": dict(TINY, n_classes=0), "model": model.state_dict()}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"old\.pt': model/h\.1\.mlp\.c_fc\.weight holds inf or nan"):
        load_checkpoint(tmp_path / "old.pt")


def test_a_checkpoint_written_without_checksums_loads_with_a_note(tmp_path, capsys):
    model = tiny_model()
    torch.save({"config": dict(TINY, n_classes=0), "model": model.state_dict()}, tmp_path / "old.pt")
    torch.testing.assert_close(IGPT.from_checkpoint(tmp_path / "old.pt")(tokens())[0], model(tokens())[0])
    assert "could not be verified" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("h.1.ln_2.g"), r"missing \['h\.1\.ln_2\.g'\]"),
    (lambda sd: sd.update(extra=torch.zeros(2)), r"unexpected \['extra'\]"),
    (lambda sd: sd.update({"wpe.weight": torch.zeros(9, 32)}), r"wpe\.weight is \[9, 32\], the model's is \[16, 32\]"),
])
def test_weights_that_do_not_fit_the_config_are_named(tmp_path, change, message):
    state = tiny_model().state_dict()
    change(state)
    torch.save({"config": dict(TINY, n_classes=0), "model": state}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"m\.pt: the weights do not fit .*" + message):
        IGPT.from_checkpoint(tmp_path / "m.pt")


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_checkpoint(path, tiny_model(seed=0))
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, tiny_model(seed=1))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


# iGPT-S's parameters but the embedding tables: per block the products (12 d^2) and two norm gains, then ln_f, wtet
S_MULTIPLIED = 24 * (12 * 512 ** 2 + 2 * 512) + 512 + 512 * 512


def test_mfu_counts_six_flops_per_parameter_but_the_embeddings_plus_the_attention_under_the_causal_mask():
    with torch.device("meta"):
        model = IGPT(IGPTConfig.preset("s"))
    per_image = (6 * S_MULTIPLIED + 12 * 24 * 512 * 1025 / 2) * 1024  # position i attends to i + 1 keys: 1025/2
    assert model.estimate_mfu(576) == pytest.approx(per_image * 576 / 989e12)


# ---- the BERT objective ----

def bert_model(seed=0, **overrides):
    return tiny_model(seed, bert=True, **overrides)


def some_mask(batch=3, seed=5):
    """A mask with a different number of masked positions in each image, at least one in each."""
    mask = torch.rand(batch, 16, generator=torch.Generator().manual_seed(seed)) < 0.3
    mask[:, 0] = True
    return mask


def test_a_bert_model_has_no_sos_and_its_checkpoint_records_the_objective(tmp_path):
    model = bert_model(bert_mask_prob=0.25)
    assert model.sos is None and "sos" not in model.state_dict()
    save_checkpoint(tmp_path / "b.pt", model)
    loaded = IGPT.from_checkpoint(tmp_path / "b.pt")
    assert loaded.config.bert and loaded.config.bert_mask_prob == 0.25
    x, mask = tokens(), some_mask()
    torch.testing.assert_close(loaded(x, mask=mask)[0], model(x, mask=mask)[0])


def test_presets_take_the_bert_objective():
    config = IGPTConfig.preset("s", bert=True)
    assert (config.n_embd, config.n_layer, config.bert, config.bert_mask_prob) == (512, 24, True, 0.15)


def test_bert_logits_match_the_original_math_written_out():
    model, x, mask = bert_model(), tokens(), some_mask()
    torch.testing.assert_close(model(x, mask=mask)[0], reference_logits(model, x, mask), rtol=1e-5, atol=1e-5)


def test_bert_attention_is_bidirectional():
    model, x = bert_model(), tokens()
    mask = torch.zeros_like(x, dtype=torch.bool)
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 16
    before, after = model(x, mask=mask)[0], model(y, mask=mask)[0]
    assert ((before[:, :9] - after[:, :9]).abs().amax(-1) > 1e-4).all()  # every earlier position sees the change


def test_a_masked_positions_own_token_reaches_no_logit():
    model, x, mask = bert_model(), tokens(), some_mask()
    y = torch.where(mask, (x + 1) % 16, x)  # every masked token changed, the rest kept
    assert (y != x).sum() == mask.sum()
    torch.testing.assert_close(model(y, mask=mask)[0], model(x, mask=mask)[0])
    unmask = mask.clone()
    unmask[:, 0] = False  # position 0 is masked in every image; shown, its token matters again
    assert not torch.allclose(model(y, mask=unmask)[0], model(x, mask=unmask)[0])


def test_bert_loss_averages_each_images_masked_positions_then_the_images():
    model, x, mask = bert_model(), tokens(), some_mask()
    logits, loss = model(x, mask=mask)
    assert len(set(mask.sum(1).tolist())) == 3  # the images have 3 different numbers of masked positions
    logp = logits.double().log_softmax(-1)
    per_image = [-logp[b, mask[b]].gather(-1, x[b, mask[b], None]).mean() for b in range(3)]
    torch.testing.assert_close(loss.double(), sum(per_image) / 3)


def test_an_image_with_nothing_masked_adds_nothing_to_the_bert_loss():
    model, x, mask = bert_model(), tokens(), some_mask()
    mask[1] = False
    logits, loss = model(x, mask=mask)
    logp = logits.double().log_softmax(-1)
    per_image = [-logp[b, mask[b]].gather(-1, x[b, mask[b], None]).mean() for b in (0, 2)]
    torch.testing.assert_close(loss.double(), sum(per_image) / 3)


def test_without_a_mask_one_is_drawn_with_bert_mask_prob():
    model = bert_model(bert_mask_prob=0.3)  # not the default 0.15: the config's value is the one drawn with
    x = tokens(batch=400)
    torch.manual_seed(3)
    drawn = model(x)[0]
    torch.manual_seed(3)
    torch.testing.assert_close(drawn, model(x, mask=torch.rand(x.shape) < 0.3)[0])


def test_a_mask_is_refused_for_an_autoregressive_model_and_must_fit_the_tokens():
    with pytest.raises(ValueError, match="mask is for BERT models"):
        tiny_model()(tokens(), mask=some_mask())
    with pytest.raises(ValueError, match=r"bool tensor shaped like the tokens \[3, 16\]"):
        bert_model()(tokens(), mask=some_mask().float())


def test_bert_classify_and_features_read_the_masked_inputs():
    model, x, mask = bert_model(n_classes=3), tokens(), some_mask()
    h = model.hidden(x, mask)
    clf_logits, gen_loss = model.classify(x, mask=mask)
    torch.testing.assert_close(clf_logits, h.mean(1) @ model.clf.weight.T)
    torch.testing.assert_close(gen_loss, model(x, mask=mask)[1])
    h = model.embed(x, mask)
    for block in model.h:
        h = block(h)
    torch.testing.assert_close(model.features(x, [2], mask=mask)[:, 0],
                               (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).mean(1))


def test_fixed_masks_depend_on_the_seed_and_the_image_alone():
    config = IGPTConfig(**TINY, bert=True, bert_mask_prob=0.3)
    whole = fixed_mask(range(10), config)
    assert whole.dtype == torch.bool and whole.shape == (10, 16)
    torch.testing.assert_close(fixed_mask([7, 2], config), whole[[7, 2]])
    assert not torch.equal(fixed_mask(range(10), config, seed=(1, 2)), whole)
    many = fixed_mask(range(2000), config)
    assert abs(many.float().mean().item() - 0.3) < 0.01


def test_a_bert_model_cannot_generate():
    with pytest.raises(ValueError, match="is a BERT model, which cannot generate"):
        generate(bert_model(), num_samples=2)


def test_mfu_of_bert_counts_attention_to_every_position():
    with torch.device("meta"):
        model = IGPT(IGPTConfig.preset("s", bert=True))
    per_image = (6 * S_MULTIPLIED + 12 * 24 * 512 * 1024) * 1024
    assert model.estimate_mfu(576) == pytest.approx(per_image * 576 / 989e12)


def test_bert_mask_prob_must_be_a_probability():
    with pytest.raises(ValueError, match="bert_mask_prob=1.5"):
        IGPTConfig(bert=True, bert_mask_prob=1.5)
