"""Sample grids: arrays of images laid out a row per class, written as PNG (and TensorBoard)."""

from __future__ import annotations

import jax
import numpy as np
from PIL import Image

from pafm_jax import checkpointing


def image_grid(images: np.ndarray, cols: int) -> np.ndarray:
  """[N, H, W, C] in [−1, 1] → a uint8 grid [rows·(H+2), cols·(W+2), 1 or 3], a row per class."""
  images = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
  if images.shape[-1] > 3:  # latents: show the first three channels
    images = images[..., :3]
  n, h, w, c = images.shape
  rows = n // cols
  grid = np.full((rows * (h + 2), cols * (w + 2), c), 255, np.uint8)
  for i in range(n):
    r, k = divmod(i, cols)
    grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, k * (w + 2) + 1:k * (w + 2) + 1 + w] = images[i]
  return grid


def save_grid_png(grid: np.ndarray, path) -> None:
  """Writes a uint8 grid from `image_grid` as a PNG (an epath or str path)."""
  path = checkpointing.workdir_path(str(path))
  path.parent.mkdir(parents=True, exist_ok=True)
  scale = max(1, 256 // grid.shape[1] + 1)  # upscale tiny images so the grid is viewable
  img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  with path.open('wb') as f:
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(f, format='PNG')


def write_sample_grid(images, cols: int, workdir: str, step: int, writer) -> str:
  """The train loop's grid of `step`: samples/samples_<step>.png and a TensorBoard image."""
  grid = image_grid(images, cols)
  path = checkpointing.workdir_path(workdir) / 'samples' / f'samples_{step:08d}.png'
  if jax.process_index() == 0:
    save_grid_png(grid, path)
  writer.write_images(step, {'samples': grid[None]})
  return str(path)
