"""Run many command lines of the scripts as a user would, for the price of one interpreter start.

    python3 tests/run_clis.py < commands.json      # [["train.py", "--data", "x"], ...] -> [[status, stderr], ...]

This process imports PyTorch and NumPy once; each command then runs in a forked copy of it, with the script run as
__main__ from the repository's root, as `python3 SCRIPT ARGS` runs it, and an exception that leaves the script is
treated as the interpreter treats it: a SystemExit's message is printed and its status kept, anything else prints
its traceback (status 1). Each command's stderr and status come back as JSON on stdout.
"""
import json
import os
import runpy
import sys
import traceback

import numpy  # noqa: F401  (imported once, here, for every command)
import torch  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv):
    """(exit status, stderr) of `python3 argv[0] argv[1:]`, in a forked copy of this process."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.dup2(write, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", buffering=1, closefd=False)
        sys.argv, sys.path[0] = list(argv), ROOT
        status = 0
        try:
            runpy.run_path(os.path.join(ROOT, argv[0]), run_name="__main__")
        except SystemExit as e:
            if isinstance(e.code, int) or e.code is None:
                status = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                status = 1
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    os.close(write)
    with open(read, errors="replace") as f:
        err = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


if __name__ == "__main__":
    os.chdir(ROOT)
    print(json.dumps([run(argv) for argv in json.load(sys.stdin)]))
