"""Image-folder datasets: DIR/<class name>/*.png|jpg|... -> images and labels."""

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from clip_jax.data import transforms

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif')


def class_folders(root: str) -> list[str]:
  if not os.path.isdir(root):
    raise FileNotFoundError(f'--images {root!r} is not a directory (expected DIR/<class name>/*.png)')
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith('.'))
  if not classes:
    raise ValueError(f'--images {root!r} has no class sub-folders (expected DIR/<class name>/*.png)')
  return classes


def load(root: str, image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(float32 normalised NHWC images, int labels, class names), resized and centre-cropped.

  Class names are the folder names with underscores read as spaces
  ('golden_retriever' -> 'golden retriever'), in sorted folder order.
  """
  classes = class_folders(root)
  images, labels, bad = [], [], []
  for label, name in enumerate(classes):
    folder = os.path.join(root, name)
    for file in sorted(os.listdir(folder)):
      if not file.lower().endswith(IMAGE_EXTENSIONS):
        continue
      path = os.path.join(folder, file)
      try:
        with Image.open(path) as im:
          images.append(transforms.preprocess(im, image_size))
      except (UnidentifiedImageError, OSError) as e:
        bad.append(f'{path} ({e.__class__.__name__})')
        continue
      labels.append(label)
  if bad:
    print(f'skipped {len(bad)} unreadable image(s): ' + '; '.join(bad[:5]))
  if not images:
    raise ValueError(f'no readable images ({", ".join(IMAGE_EXTENSIONS)}) under {root!r}')
  return np.stack(images), np.asarray(labels), [c.replace('_', ' ') for c in classes]
