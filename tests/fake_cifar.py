"""CIFAR-10's official python pickles in miniature, for the tests of data.py and quantize.py."""
import os
import pickle

import numpy as np


def cifar_batch(path, images, labels, key=b"labels"):
    """A batch as the official files hold it: labels a list of Python ints, the data uint8 [N, 3072]. (The official
    files are Python 2's protocol 2; protocol 4 is the one of Python 3 that pickles bytes and arrays alike.)"""
    with open(path, "wb") as f:
        pickle.dump({b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), key: [int(l) for l in labels],
                     b"batch_label": b"fake"}, f, protocol=4)


def write_cifar10(folder, per_batch=2):
    """The official cifar-10-batches-py layout; image i of the train set is filled with value i."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for b in range(5):
        vals = np.arange(b * per_batch, (b + 1) * per_batch)
        images = np.broadcast_to(vals[:, None, None, None], (per_batch, 32, 32, 3)).astype(np.uint8).copy()
        images[:, 0, 0] = [1, 2, 3]  # channel order check
        cifar_batch(os.path.join(folder, f"data_batch_{b + 1}"), images, list(vals % 10))
    cifar_batch(os.path.join(folder, "test_batch"), rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), [9, 0, 1])
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)
