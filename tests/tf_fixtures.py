"""The TensorFlow checkpoint fixture in tests/fixtures/, written by real TensorFlow (tests/make_tf_fixture.py), with
golden logits from the original math written in TensorFlow; nothing that reads it imports TensorFlow."""
from pathlib import Path

import numpy as np


FIXTURES = Path(__file__).parent / "fixtures"
PREFIX = FIXTURES / "tf" / "model.ckpt-1000000"
GOLDEN = np.load(FIXTURES / "tf_golden.npz")
