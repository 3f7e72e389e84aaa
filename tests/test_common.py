"""common.py: the PNG grid, atomic writes, one-line errors, the number of threads, progress lines."""
import io
import os
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
from common import Progress, argument_parser, atomic_write, save_grid, script, set_threads


def test_save_grid_lays_out_rows_and_columns(tmp_path):
    images = np.arange(2 * 3 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 3, 2, 2, 3)
    save_grid(images, str(tmp_path / "g.png"), pad=1, scale=2)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (1 + 2 * 5, 1 + 3 * 5, 3)
    assert (grid[0] == 255).all() and (grid[:, 5] == 255).all()
    np.testing.assert_array_equal(grid[6:10, 11:15], images[1, 2].repeat(2, 0).repeat(2, 1))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o007, 0o660)])
def test_atomic_write_gives_the_file_the_users_usual_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "f", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == mode


def test_atomic_write_removes_the_temp_files_of_killed_writes_only(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    stale = tmp_path / f".tmp-f.{host}.{gone.pid}.x1"
    running = tmp_path / f".tmp-f.{host}.{os.getpid()}.x2"  # a writer that still runs
    elsewhere = tmp_path / f".tmp-f.otherhost.{gone.pid}.x3"
    for p in (stale, running, elsewhere):
        p.write_bytes(b"partial")
    atomic_write(tmp_path / "f", lambda f: f.write(b"whole"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["f", running.name, elsewhere.name])
    assert (tmp_path / "f").read_bytes() == b"whole"


@script
def raises(error):
    raise error


@pytest.mark.parametrize("error, message", [
    (ValueError("bad value\nsecond line"), "test_common.py: bad value second line"),
    (FileNotFoundError("no file x"), "test_common.py: no file x"),
    (KeyError("'k' is missing"), "test_common.py: 'k' is missing"),
    (SystemExit("the script's own words"), "test_common.py: the script's own words"),
])
def test_a_user_error_becomes_one_line_named_by_the_script(error, message):
    with pytest.raises(SystemExit) as e:
        raises(error)
    assert e.value.code == message


def test_ctrl_c_becomes_one_line_and_status_130(capsys):
    with pytest.raises(SystemExit) as e:
        raises(KeyboardInterrupt())
    assert e.value.code == 130 and capsys.readouterr().err == "test_common.py: interrupted\n"


def test_other_errors_are_left_alone():
    with pytest.raises(RuntimeError):
        raises(RuntimeError("a bug"))


def test_a_flag_error_is_one_line_pointing_to_help(capsys):
    parser = argument_parser("doc")
    parser.add_argument("--compile", choices=["auto", "on", "off"])
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--compile", "yes"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'yes'" in err and "--help" in err


@pytest.fixture
def threads():
    """Leaves PyTorch's thread count as it found it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_default_to_the_idle_cores_shared_among_the_processes(threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for idle, processes, expected in [(8.0, 1, 8), (8.0, 2, 4), (2.4, 1, 2), (0.0, 1, 1)]:
        monkeypatch.setattr(common, "idle_cores", lambda: idle)
        assert set_threads(0, processes) == expected
    assert set_threads(3) == 3


def test_idle_cores_are_the_idle_share_of_the_cpu_time_spent_meanwhile(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    snapshots = iter([[100, 0, 50, 1000, 10, 0, 0, 0], [160, 0, 70, 1095, 15, 0, 0, 0]])  # 80 busy, 100 idle
    monkeypatch.setattr(common, "cpu_times", lambda: next(snapshots))
    assert common.idle_cores(interval=0) == pytest.approx(8 * 100 / 180)


def test_without_proc_stat_idle_cores_are_the_cores_less_the_load_average(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(common, "cpu_times", lambda: (_ for _ in ()).throw(FileNotFoundError("/proc/stat")))
    monkeypatch.setattr(os, "getloadavg", lambda: (5.6, 0.0, 0.0))
    assert common.idle_cores(interval=0) == pytest.approx(2.4)


def test_cpu_times_reads_the_first_line_of_proc_stat(tmp_path):
    (tmp_path / "stat").write_text("cpu  10 2 30 400 5 6 7 8 0 0\ncpu0 5 1 15 200 2 3 3 4 0 0\n")
    assert common.cpu_times(str(tmp_path / "stat")) == [10, 2, 30, 400, 5, 6, 7, 8]


def test_with_omp_num_threads_set_threads_0_keeps_the_count_it_set_and_looks_at_no_core(threads, monkeypatch):
    torch.set_num_threads(3)  # as PyTorch started under OMP_NUM_THREADS=3
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(common, "idle_cores", lambda *a: pytest.fail("idle_cores was consulted"))
    assert set_threads(0) == 3 and torch.get_num_threads() == 3
    assert set_threads(1) == 1  # a number given is taken as it is


def test_a_negative_number_of_threads_is_refused_naming_the_flag(threads):
    with pytest.raises(ValueError, match="--threads -1"):
        set_threads(-1)


class Stream(io.StringIO):
    """A stand-in for stderr that says whether it is a terminal."""

    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_progress_rewrites_a_terminals_line_and_writes_a_log_whole_lines_now_and_then(tty, monkeypatch):
    monkeypatch.setattr(sys, "stderr", Stream(tty))
    now = [0.0]
    monkeypatch.setattr(common.time, "time", lambda: now[0])
    show = Progress(every=10)
    for i, t in enumerate([0, 4, 9, 10, 12], 1):
        now[0] = t
        show(f"step {i}/5", last=i == 5)
    if tty:
        assert sys.stderr.getvalue() == "".join(f"\rstep {i}/5\033[K" for i in range(1, 6)) + "\n"
    else:
        assert sys.stderr.getvalue() == "step 1/5\nstep 4/5\nstep 5/5\n"  # the first, ten seconds on, the last
