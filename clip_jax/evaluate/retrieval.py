"""Image <-> text retrieval recall@K from paired embeddings."""

from typing import Sequence

import numpy as np


def recall_at_k(image_features: np.ndarray, text_features: np.ndarray, ks: Sequence[int] = (1, 5, 10),
                image_ids_of_texts: np.ndarray | None = None) -> dict[str, float]:
  """Recall@K both ways for L2-normalised features, as {'i2t_R1': ..., 't2i_R1': ...}.

  (Keys avoid '@' so they are valid TensorBoard tag names.)

  By default text i belongs to image i. With several captions per image pass
  `image_ids_of_texts` [num_texts]: an image query hits when any of its texts
  is in the top K, a text query when its image is.
  """
  if image_ids_of_texts is None:
    if len(image_features) != len(text_features):
      raise ValueError(f'{len(image_features)} images but {len(text_features)} texts: pass image_ids_of_texts')
    image_ids_of_texts = np.arange(len(text_features))
  image_ids_of_texts = np.asarray(image_ids_of_texts)
  sim = np.asarray(image_features, np.float32) @ np.asarray(text_features, np.float32).T  # [I, T]
  results = {}
  # text -> image: rank of the true image among all images for each text
  t2i_rank = np.argsort(-sim.T, axis=1, kind='stable')
  t2i_pos = np.argmax(t2i_rank == image_ids_of_texts[:, None], axis=1)
  # image -> text: best rank among the image's own texts
  i2t_rank = np.argsort(-sim, axis=1, kind='stable')
  owns = image_ids_of_texts[i2t_rank] == np.arange(len(sim))[:, None]
  i2t_pos = np.argmax(owns, axis=1)
  for k in ks:
    results[f'i2t_R{k}'] = float(np.mean(i2t_pos < k))
    results[f't2i_R{k}'] = float(np.mean(t2i_pos < k))
  return results
