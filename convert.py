"""
Bring the released Image GPT weights into igpt.py's checkpoint format, move weights to and from Hugging Face, and
make the folder of a sharded checkpoint (train.py --fsdp) the single .pt that sample.py and probe.py read.

tf_to_igpt maps the original variables onto igpt.py's modules and infers the config from their shapes (tf_config):
model/wte, wpe, sos, wtet, ln_f/g, each layer's ln_1/g and ln_2/g, and the classifier model/clf/wclf (when there
is one) are taken as they are; a layer's attn/{q,k,v}_proj ([n_head, d_head, n_embd] each) are joined into one
c_attn weight; attn/c_proj and mlp/{c_fc,c_proj}/w, which the original multiplies as x @ w with w [in, out], are
turned into nn.Linear's [out, in]. Only the model's variables are read, by tf_checkpoint.py with NumPy alone;
optimizer slots and global_step are skipped. A checkpoint without model/sos is one of the release's BERT models
(igpt-{s,m,l}-bert), trained on masked pixels: it converts to IGPTConfig(bert=True).

    python convert.py path/to/model.ckpt-1000000 --out igpt_s.pt --palette kmeans_centers.npy   # original TF files
    python convert.py --download s --step 1000000 --dir release --palette                       # fetch, then convert
    python convert.py --download s --bert --dir release                                         # a BERT model
    python convert.py --hf path/to/imagegpt-small --out igpt_s.pt                               # a local HF folder
    python convert.py --to_hf --ckpt igpt_s.pt --out imagegpt-small                             # ours -> HF folder
    python convert.py --from_dcp out/ckpt.dcp --out igpt_xl.pt                                  # sharded -> one file

A Hugging Face folder keeps the palette where HF's ImageGPTImageProcessor reads it, as the "clusters" of
preprocessor_config.json: --to_hf writes it and --hf reads it back.
"""
import importlib
import json
import math
import os
import re
import time
import warnings
import zipfile

import numpy as np
import torch

import parallel
from igpt import IGPT, IGPTConfig, save_checkpoint
from common import Progress, argument_parser, atomic_write, log, script, write_json
from data import fetch
from palette import load_palette
from tf_checkpoint import TFCheckpoint

BASE_URL = "https://openaipublic.blob.core.windows.net/image-gpt"
STEPS = (131000, 262000, 524000, 1000000)  # the released training steps
DATASET_FILES = ("trX", "trY", "vaX", "vaY", "teX", "teY")  # a released dataset: {name}_{file}.npy


# ---- the original variables -> igpt.py ----

def tf_config(ckpt) -> IGPTConfig:
    """The IGPTConfig of an original checkpoint (a TFCheckpoint), inferred from its variables' shapes; a BERT model
    is the one without model/sos (its masking rate is not stored: the release's 0.15 is assumed)."""
    n_vocab, n_embd = ckpt.entry("model/wte").shape
    n_ctx = ckpt.entry("model/wpe").shape[0]
    n_px = math.isqrt(n_ctx)
    if n_px * n_px != n_ctx:
        raise ValueError(f"'model/wpe' in {ckpt.prefix} has {n_ctx} positions, not a square number of pixels")
    layers = [int(m.group(1)) for n in ckpt.entries if (m := re.match(r"model/h(\d+)/", n))]
    n_head = ckpt.entry("model/h0/attn/q_proj").shape[0]
    n_classes = ckpt.entry("model/clf/wclf").shape[0] if "model/clf/wclf" in ckpt.entries else 0
    return IGPTConfig(n_px=n_px, n_vocab=n_vocab, n_embd=n_embd, n_head=n_head, n_layer=max(layers) + 1,
                      n_classes=n_classes, bert="model/sos" not in ckpt.entries)


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
            "ln_f.g": (["model/ln_f/g"], (d,), same),
            "wtet.weight": (["model/wtet"], (V, d), same)}  # logits = h @ wtet.T, as nn.Linear computes
    if not c.bert:
        plan["sos"] = (["model/sos"], (d,), same)
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
    arrays, nbytes, t0, show = {}, 0, time.time(), Progress()
    for i, name in enumerate(names, 1):
        arrays[name] = ckpt.read(name)
        nbytes += ckpt.entries[name].size
        if verbose:
            rate = nbytes / 1e6 / max(time.time() - t0, 1e-9)
            shard = os.path.basename(ckpt.shard_path(ckpt.entries[name].shard))
            show(f"read {i}/{len(names)} tensors, {nbytes / 1e6:.1f} MB, {rate:.0f} MB/s, {shard}", i == len(names))
    state = {k: torch.from_numpy(np.ascontiguousarray(fn(*(arrays.pop(n) for n in ns)), dtype=np.float32))
             for k, (ns, _, fn) in plan.items()}
    return IGPT.from_state_dict(c, state).eval()


# ---- Hugging Face ImageGPT (transformers' ImageGPTForCausalImageModeling) ----
# Differences from ours: wte has an extra last row, the SOS token, which is our `sos` (HF feeds it as input id
# vocab_size-1 at position 0); lm_head is our wtet; the layers are GPT-2 Conv1D (weight [in, out], with biases
# that the original model does not have); the norm is the same one, without mean subtraction.

def _require(module):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"Hugging Face interop needs {module}: pip install {module}") from e


def _read_json(path):
    """The JSON object of one of a Hugging Face folder's files; anything else is a ValueError naming it."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not an object: give the file save_pretrained "
                         "wrote")
    return obj


def _hf_weights(folder):
    """The tensors of a Hugging Face folder's model.safetensors, else of its pytorch_model.bin (loaded with
    weights_only=True); a file that cannot be read safely as a dict of tensors is a ValueError naming it."""
    safetensors, pickled = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(safetensors):
        path, load = safetensors, _require("safetensors.torch").load_file
    elif os.path.isfile(pickled):
        path, load = pickled, lambda p: torch.load(p, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    try:
        with warnings.catch_warnings():  # a damaged file can make torch warn before it fails
            warnings.simplefilter("ignore")
            hf = load(path)
    except Exception:  # torch's own message would suggest loading the file unsafely
        hf = None
    if not isinstance(hf, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in hf.items()):
        raise ValueError(f"{path!r} cannot be read safely as the model's weights: it is damaged, cut short, or holds "
                         "Python objects beyond tensors (never loaded: they could run code); download the model again")
    return hf


def hf_to_igpt(folder) -> IGPT:
    """An IGPT from a local Hugging Face ImageGPT folder: config.json plus model.safetensors or pytorch_model.bin
    (e.g. a copy of openai/imagegpt-small), with the palette of preprocessor_config.json as `model.palette` (None
    when the folder has none)."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder} is no Hugging Face model folder (it has no config.json): give a folder "
                                "that save_pretrained wrote, such as a download of openai/imagegpt-small")
    cfg = _read_json(os.path.join(folder, "config.json"))
    missing = [k for k in ("n_embd", "n_positions", "vocab_size", "n_head", "n_layer") if k not in cfg]
    if missing:
        raise ValueError(f"{folder}/config.json lacks {', '.join(missing)}: give the config.json that save_pretrained "
                         "wrote with the weights")
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

    hf = {k.removeprefix("transformer."): v for k, v in _hf_weights(folder).items()
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
    model = IGPT.from_state_dict(config, state).eval()
    processor = os.path.join(folder, "preprocessor_config.json")
    clusters = _read_json(processor).get("clusters") if os.path.isfile(processor) else None
    model.palette = None if clusters is None else torch.tensor(clusters, dtype=torch.float32)
    if model.palette is not None and model.palette.shape != (V, 3):
        raise ValueError(f"{processor} has clusters of shape {list(model.palette.shape)}; the model needs [{V}, 3]")
    return model


def igpt_to_hf(model, folder, force=False, palette=None):
    """Write model as a Hugging Face ImageGPT folder (config.json + model.safetensors) that
    transformers.ImageGPTForCausalImageModeling.from_pretrained loads, and the palette (default: model.palette)
    as the clusters of preprocessor_config.json, which AutoImageProcessor loads. The classifier head, if any, is
    left out."""
    if model.config.bert:
        raise ValueError("a BERT model cannot be exported to Hugging Face: transformers' ImageGPT is autoregressive "
                         "only (it has no masked-pixel model to hold it); keep the igpt checkpoint")
    c = model.config
    palette = getattr(model, "palette", None) if palette is None else palette
    if palette is not None and len(palette) != c.n_vocab:
        raise ValueError(f"the palette has {len(palette)} colours but the model has n_vocab={c.n_vocab}")
    transformers, save_file = _require("transformers"), _require("safetensors.torch").save_file
    path = os.path.join(folder, "model.safetensors")
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        _refuse_overwrite(os.path.join(folder, name), force)
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
    # each file atomically, so an export cut short leaves no half-written file: the weights go by name into
    # atomic_write's temp file, which it then flushes and renames
    atomic_write(path, lambda f: save_file({k: v.contiguous() for k, v in hf.items()}, f.name,
                                           metadata={"format": "pt"}))
    write_json(os.path.join(folder, "config.json"), config.to_dict())
    if palette is None:
        stale = os.path.join(folder, "preprocessor_config.json")
        if os.path.exists(stale):  # an earlier export's palette, which is not this model's
            os.remove(stale)
        log(f"note: the model has no palette, so {folder} has no preprocessor_config.json: pass --palette NPY")
        return
    processor = {  # as ImageGPTImageProcessor.save_pretrained writes it
        "image_processor_type": "ImageGPTImageProcessor", "clusters": np.asarray(palette, np.float32).tolist(),
        "do_resize": True, "size": {"height": c.n_px, "width": c.n_px}, "resample": 2, "do_normalize": True,
        "do_color_quantize": True}
    write_json(os.path.join(folder, "preprocessor_config.json"), processor)


# ---- downloading the release (data.fetch: resumable, urllib only) ----

def release_name(model, bert=False):
    """The release's name of a model: igpt-s, or igpt-s-bert for its BERT model."""
    return f"igpt-{model}" + ("-bert" if bert else "")


def download_release(model, step, folder, palette=False, dataset=None, base_url=BASE_URL, bert=False):
    """Fetch the released checkpoint of size model ("s", "m", "l") at training step into folder (the BERT model's
    with bert), with the palette (kmeans_centers.npy) and a dataset's six .npy files if asked; the .meta graph is not
    needed and not fetched. Returns the checkpoint prefix. Every release names its files alike (model.ckpt-STEP.*),
    so each goes to a folder of its own, folder/igpt-SIZE/ or folder/igpt-SIZE-bert/, where a file already there
    (which data.fetch skips or resumes) is never another model's."""
    name = f"model.ckpt-{step}"
    prefix = os.path.join(folder, release_name(model, bert), name)
    url = f"{base_url}/checkpoints/{release_name(model, bert)}/{step}/{name}"
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    fetch(url + ".index", prefix + ".index")
    ckpt = TFCheckpoint(prefix)  # the index says how many data shards there are
    for i in range(ckpt.num_shards):
        fetch(url + ckpt.shard_path(i)[len(prefix):], ckpt.shard_path(i))
    if palette:
        fetch(f"{base_url}/color-clusters/kmeans_centers.npy", os.path.join(folder, "kmeans_centers.npy"))
    for name in DATASET_FILES if dataset else ():
        fetch(f"{base_url}/datasets/{dataset}_{name}.npy", os.path.join(folder, f"{dataset}_{name}.npy"))
    return prefix


def _refuse_overwrite(path, force):
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")


@script
def main(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument("checkpoint", nargs="?", default=None, help="an original TF checkpoint prefix to convert")
    parser.add_argument("--out", default=None, help="the .pt to write (with --to_hf: the folder); with --download "
                        "it defaults to DIR/igpt-SIZE-STEP.pt (DIR/igpt-SIZE-bert-STEP.pt with --bert)")
    parser.add_argument("--palette", nargs="?", const=True, default=None, metavar="NPY",
                        help="a palette .npy [n_vocab, 3] to store in the checkpoint (or the HF folder); with "
                        "--download and no NPY, the release's kmeans_centers.npy is fetched")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument("--download", choices=["s", "m", "l"], default=None,
                        help="fetch this released model size, then convert it")
    parser.add_argument("--bert", action="store_true",
                        help="with --download: the release's BERT model of that size (igpt-SIZE-bert)")
    parser.add_argument("--step", type=int, choices=STEPS, default=1000000,
                        help="with --download: the training step of the checkpoint")
    parser.add_argument("--dir", default="release", help="with --download: where the files go")
    parser.add_argument("--dataset", choices=["imagenet", "cifar10"], default=None,
                        help="with --download: also fetch this colour-quantised dataset")
    parser.add_argument("--base_url", default=BASE_URL, help="with --download: where the release lives")
    parser.add_argument("--hf", default=None, metavar="FOLDER", help="import a Hugging Face ImageGPT folder")
    parser.add_argument("--to_hf", action="store_true", help="export --ckpt to a Hugging Face ImageGPT folder --out")
    parser.add_argument("--ckpt", default=None, help="with --to_hf: the checkpoint of ours to export")
    parser.add_argument("--from_dcp", default=None, metavar="FOLDER",
                        help="the folder of a sharded checkpoint (train.py --fsdp, e.g. out/ckpt.dcp): its weights "
                        "and palette into one .pt")
    args = parser.parse_args(argv)
    sources = [x for x in (args.checkpoint, args.download, args.hf, args.ckpt if args.to_hf else None,
                           args.from_dcp) if x is not None]
    if len(sources) != 1 or (args.ckpt is not None) != args.to_hf:
        parser.error("give exactly one of: a TF checkpoint, --download, --hf, --to_hf --ckpt PT, --from_dcp FOLDER")
    if args.bert and not args.download:
        parser.error("--bert picks the model --download fetches; a BERT checkpoint on disk converts as it is "
                     "(it is recognised by its missing model/sos)")
    if args.download and args.out is None:
        args.out = os.path.join(args.dir, f"{release_name(args.download, args.bert)}-{args.step}.pt")
    if args.out is None:
        parser.error("--out is required")
    if args.palette is True and not args.download:
        parser.error("--palette needs a path unless --download fetches the release's")

    if args.checkpoint and zipfile.is_zipfile(args.checkpoint):
        raise SystemExit(f"{args.checkpoint} is a checkpoint of ours already (a .pt): sample.py, train.py and "
                         f"probe.py read it as it is; to export it: convert.py --to_hf --ckpt {args.checkpoint} "
                         "--out FOLDER")
    palette = load_palette(args.palette) if isinstance(args.palette, str) else None
    if args.to_hf:
        igpt_to_hf(IGPT.from_checkpoint(args.ckpt), args.out, args.force, palette)
        log(f"wrote {args.out}")
        return
    _refuse_overwrite(args.out, args.force)  # before hours of downloading
    if args.download:
        prefix = download_release(args.download, args.step, args.dir, args.palette is True, args.dataset,
                                  args.base_url, args.bert)
        if args.palette is True:
            palette = load_palette(os.path.join(args.dir, "kmeans_centers.npy"))
        model = tf_to_igpt(TFCheckpoint(prefix))
    elif args.hf:
        model = hf_to_igpt(args.hf)
    elif args.from_dcp:
        model = IGPT.from_saved(parallel.load_weights(args.from_dcp), args.from_dcp)
    else:
        model = tf_to_igpt(TFCheckpoint(args.checkpoint))
    if model.config.bert:
        log("model/sos is absent: a BERT model (masked pixels, bidirectional attention), converted with bert=True")
    palette = getattr(model, "palette", None) if palette is None else palette  # HF clusters; a run's
    save_checkpoint(args.out, model, palette=palette)
    log(f"wrote {args.out}: {model.get_num_params() / 1e6:.1f}M parameters, {model.config}")


if __name__ == "__main__":
    main()
