"""The reference train step: open_clip's CLIP of the same architecture, in PyTorch.

Same batch shape, float32, AdamW with the config's hyper-parameters, gradient
clipping at the config's norm, and open_clip's own contrastive loss
(`open_clip.loss.ClipLoss`), on the host CPU, or CUDA where torch has it.
Denormals are flushed to zero, as XLA's CPU backend does (a process-wide setting).
"""

import time

import numpy as np


class TorchStep:
  """One open_clip training step per call; the batch is made once, already on the device."""

  def __init__(self, config, threads: int, seed: int = 0):
    import open_clip  # pylint: disable=g-import-not-at-top  # optional reference
    import torch  # pylint: disable=g-import-not-at-top
    from clip_jax.convert import open_clip as oc_convert  # pylint: disable=g-import-not-at-top
    self._torch = torch
    torch.set_num_threads(threads)
    # XLA's CPU backend computes with denormals flushed to zero; PyTorch does not by default, and
    # denormals (quick_gelu's sigmoid tails, tiny gradients) made the tiny model's step 10-50x slower.
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    self.batch_size = config.batch_size
    m, o = config.model, config.optim
    self.model = open_clip.CLIP(**oc_convert.open_clip_model_cfg(m)).to(self.device).train()
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                       weight_decay=o.weight_decay)
    self.clip_norm = o.get('grad_clip_norm')
    self.loss = open_clip.loss.ClipLoss()
    rng = np.random.default_rng(seed)
    b, size, t = config.batch_size, m.vision.image_size, m.text
    self.images = torch.from_numpy(rng.standard_normal((b, 3, size, size)).astype(np.float32)).to(self.device)
    tokens = rng.integers(1, t.vocab_size - 1, (b, t.context_length))
    tokens[:, -1] = t.vocab_size - 1
    self.tokens = torch.from_numpy(tokens).to(self.device)

  def __call__(self) -> float:
    torch = self._torch
    start = time.perf_counter()
    self.optimizer.zero_grad(set_to_none=True)
    out = self.model(self.images, self.tokens)
    loss = self.loss(out['image_features'], out['text_features'], out['logit_scale']) if isinstance(out, dict) \
        else self.loss(*out[:3])
    loss.backward()
    if self.clip_norm:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
    self.optimizer.step()
    if self.device.type == 'cuda':
      torch.cuda.synchronize()
    return time.perf_counter() - start
