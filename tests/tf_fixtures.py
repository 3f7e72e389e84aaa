"""The TensorFlow checkpoint fixtures in tests/fixtures/, written by real TensorFlow (tests/make_tf_fixture.py), with
golden logits from the original math written in TensorFlow: an autoregressive model and a BERT one (BERT_*, with
its golden loss under a fixed mask); nothing that reads them imports TensorFlow."""
from pathlib import Path

import numpy as np


FIXTURES = Path(__file__).parent / "fixtures"
PREFIX = FIXTURES / "tf" / "model.ckpt-1000000"
GOLDEN = np.load(FIXTURES / "tf_golden.npz")
BERT_PREFIX = FIXTURES / "tf_bert" / "model.ckpt-1000000"
BERT_GOLDEN = np.load(FIXTURES / "tf_bert_golden.npz")
