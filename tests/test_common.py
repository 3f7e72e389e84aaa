"""common.py: the PNG grid."""
import numpy as np
from PIL import Image

from common import save_grid


def test_save_grid_lays_out_rows_and_columns(tmp_path):
    images = np.arange(2 * 3 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 3, 2, 2, 3)
    save_grid(images, str(tmp_path / "g.png"), pad=1, scale=2)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (1 + 2 * 5, 1 + 3 * 5, 3)
    assert (grid[0] == 255).all() and (grid[:, 5] == 255).all()
    np.testing.assert_array_equal(grid[6:10, 11:15], images[1, 2].repeat(2, 0).repeat(2, 1))
