"""train.py killed right after its Nth checkpoint of an --fsdp run, as a kill at that moment would leave it; on every
process of a torchrun launch:

    python -m torch.distributed.run --nproc_per_node=2 tests/killed_train.py N TRAIN_ARGS...
"""
import os
import sys

import parallel
import train

saves, real_save = [], parallel.save_sharded


def save_then_die(*args, **kwargs):
    real_save(*args, **kwargs)
    saves.append(1)
    if len(saves) == int(sys.argv[1]):
        os._exit(9)  # no clean-up, no exception handling: the process is gone


parallel.save_sharded = save_then_die
train.main(sys.argv[2:])
