"""LSeg: language-driven semantic segmentation (Li et al. 2022, isl-org/lang-seg).

  images -> CLIP ViT, hooked at four depths -> DPT decoder (clip_jax.models.dpt)
         -> 1x1 conv to the joint embedding -> L2-normalised pixel embeddings (stride 2)
  logits = logit_scale * cos(pixel, class text embedding), logit_scale fixed at 1/0.07
         -> optional spatial regularisation -> bilinear (align_corners) upsampling to the image

The class embeddings come from CLIP's text tower, which LSeg keeps frozen: the
module owns that tower (so one checkpoint holds it) and exposes it as
`encode_text`, but `__call__` takes precomputed embeddings, so a training
step never differentiates through it. Any label set works at inference.

Departures from lang-seg, all deliberate: the image encoder is CLIP's ViT (so
it initialises from a CLIP checkpoint, `init_from_clip`) where lang-seg uses
timm's ImageNet ViT; logits are float32 (lang-seg casts the pixel embeddings
to fp16 for the product); positional embeddings are not resized, so images
must be the ViT's image_size; and the final x2 upsampling is a resize to the
input size, the same thing when the image size is a multiple of 32.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from clip_jax.layers.resample import conv, constrain_map, resize_bilinear_align_corners
from clip_jax.models import transfer, zoo
from clip_jax.models.clip import l2_normalize
from clip_jax.models.dpt import READOUTS, DPTDecoder

LOGIT_SCALE = 1 / 0.07  # lang-seg: exp(log(1 / 0.07)), a constant, not a parameter
SPATIAL_REG_KINDS = ('none', 'depthwise', 'bottleneck')
SPATIAL_REG_ACTS = {'relu': nn.relu, 'lrelu': lambda x: nn.leaky_relu(x, 0.01), 'tanh': jnp.tanh}
SHARED_TOWERS = ('vision', 'text')


class SpatialRegularizer(nn.Module):
  """lang-seg's optional blocks on the class logits (arch_option 1 / 2).

  One 3x3 conv with a single input and output channel, shared by every class
  channel and by every repetition, runs `depth` times; 'bottleneck' adds each
  pixel's max over classes before the activation, and the last repetition has
  no activation. Works for any number of classes.
  """
  kind: str
  depth: int
  act: str = 'relu'

  @nn.compact
  def __call__(self, logits):
    b, h, w, c = logits.shape
    depthwise = nn.Conv(1, (3, 3), padding=((1, 1), (1, 1)), name='depthwise',
                        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                 (None, None, None, None)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))
    x = logits
    for i in range(self.depth):
      per_class = jnp.moveaxis(x, -1, 1).reshape(b * c, h, w, 1)
      y = jnp.moveaxis(depthwise(per_class).reshape(b, c, h, w), 1, -1)
      if self.kind == 'bottleneck':
        y = y + x.max(axis=-1, keepdims=True)
      x = SPATIAL_REG_ACTS[self.act](y) if i < self.depth - 1 else y
    return x


class LSeg(nn.Module):
  """`apply(variables, images [B, S, S, 3], class_embeddings [C, D])` -> logits [B, S, S, C]
  (with `return_pixels=True`: (logits, the pixel embeddings [B, S/2, S/2, D])).

  `method='pixel_embeddings'` gives the L2-normalised per-pixel embeddings
  [B, S/2, S/2, D] (for S a multiple of 32) and `method='encode_text'` the
  L2-normalised class embeddings of token rows [C, context]. `init` creates
  the text tower's parameters too, so `init_from_clip` can fill both towers.
  """
  vision: nn.Module
  text: nn.Module
  embed_dim: int
  hooks: Sequence[int]
  readout: str = 'project'
  dims: Sequence[int] = (96, 192, 384, 768)
  features: int = 256
  use_bn: bool = True
  spatial_reg: str = 'none'
  spatial_reg_depth: int = 2
  spatial_reg_act: str = 'relu'
  logit_scale: float = LOGIT_SCALE
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.decoder = DPTDecoder(patch_size=self.vision.patch_size, readout=self.readout, dims=tuple(self.dims),
                              features=self.features, use_bn=self.use_bn, **kw)
    self.head = conv(self.embed_dim, 1, **kw)
    if self.spatial_reg != 'none':
      self.regularizer = SpatialRegularizer(self.spatial_reg, self.spatial_reg_depth, self.spatial_reg_act)

  def _check_images(self, images):
    s = self.vision.image_size
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be float NHWC [batch, {s}, {s}, 3]; got shape {tuple(images.shape)} '
                       '(channels-first input? transpose to NHWC)')
    if images.shape[1:3] != (s, s):
      raise ValueError(f'images are {images.shape[1]}x{images.shape[2]} but the LSeg encoder expects {s}x{s} '
                       '(its positional embeddings are not resized); resize/crop them to model.vision.image_size')

  def encode_text(self, tokens):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'tokens must be integer [num_classes, length]; got {tokens.dtype} {tuple(tokens.shape)}')
    return l2_normalize(self.text(tokens))

  def pixel_embeddings(self, images, *, train: bool = False):
    self._check_images(images)
    hidden = self.vision(images, hooks=tuple(self.hooks))
    grid = self.vision.grid_size
    x = self.decoder(hidden, (grid, grid), train=train)
    return constrain_map(l2_normalize(self.head(x)))

  def __call__(self, images, class_embeddings, *, train: bool = False, return_pixels: bool = False):
    if class_embeddings.ndim != 2 or class_embeddings.shape[-1] != self.embed_dim:
      raise ValueError(f'class_embeddings must be [num_classes, {self.embed_dim}] (encode_text of the class '
                       f'prompts); got shape {tuple(class_embeddings.shape)}')
    if self.is_initializing():  # create the (frozen) text tower's parameters with the rest
      self.encode_text(jnp.zeros((1, self.text.context_length), jnp.int32))
    pixels = self.pixel_embeddings(images, train=train)
    logits = self.logit_scale * jnp.einsum('bhwd,cd->bhwc', pixels, l2_normalize(class_embeddings))
    logits = constrain_map(logits)
    if self.spatial_reg != 'none':
      logits = self.regularizer(logits)
    logits = resize_bilinear_align_corners(logits, images.shape[1:3])
    return (logits, pixels) if return_pixels else logits


# --- configuration -----------------------------------------------------------------------------

def _default_dims(width: int):
  # lang-seg: ViT-L (1024) -> (256, 512, 1024, 1024); ViT-B (768) -> (96, 192, 384, 768).
  return (256, 512, 1024, 1024) if width == 1024 else (width // 8, width // 4, width // 2, width)


def lseg_config(clip='ViT-B/16', *, hooks: Optional[Sequence[int]] = None, readout: str = 'project',
                dims: Optional[Sequence[int]] = None, features: int = 256, use_bn: bool = True,
                spatial_reg: str = 'none', spatial_reg_depth: int = 2, spatial_reg_act: str = 'relu',
                logit_scale: float = LOGIT_SCALE) -> ml_collections.ConfigDict:
  """An LSeg model config over a CLIP ViT config (a zoo name or a clip_jax.models.zoo config).

  The CLIP fields (embed_dim, act, dtype, param_dtype, attn_implementation,
  remat, scan_layers, vision, text) are kept as they are, so `clip_config_of`
  recovers the CLIP config whose checkpoint `init_from_clip` copies from.
  hooks default to the ends of the four quarters of the tower (lang-seg's
  [2, 5, 8, 11] for 12 blocks, [5, 11, 17, 23] for 24).
  """
  base = zoo.get(clip) if isinstance(clip, str) else ml_collections.ConfigDict(clip.to_dict())
  if base.vision.kind != 'vit':
    raise ValueError(f"LSeg needs a ViT image tower; model.vision.kind={base.vision.kind!r} (use a 'ViT-...' CLIP)")
  layers = base.vision.layers
  if hooks is None:
    hooks = tuple(max(layers * (i + 1) // 4 - 1, 0) for i in range(4))
  c = base.to_dict()
  for clip_only in ('init_logit_scale', 'init_logit_bias'):
    c.pop(clip_only, None)
  c.update(name='lseg', logit_scale=float(logit_scale),
           decoder=dict(hooks=tuple(hooks), readout=readout, dims=tuple(dims or _default_dims(base.vision.width)),
                        features=features, use_bn=use_bn),
           spatial_reg=dict(kind=spatial_reg, depth=spatial_reg_depth, act=spatial_reg_act))
  return ml_collections.ConfigDict(c)


def clip_config_of(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The CLIP config whose towers `config`'s LSeg shares (for `init_from_clip`)."""
  c = zoo.clip_config(config.embed_dim, config.vision.to_dict(), config.text.to_dict(), act=config.act)
  for field in ('dtype', 'param_dtype', 'attn_implementation', 'remat', 'scan_layers'):
    c[field] = config.get(field, c[field])
  return c


ZOO = {
    'ViT-B/16': lambda: lseg_config('ViT-B/16'),
    'ViT-B/32': lambda: lseg_config('ViT-B/32'),
    # Tests and CPU runs: a 4-block 32x32 ViT, grid 4 -> a 8/4/2/1 pyramid, seconds to compile.
    'tiny': lambda: lseg_config(zoo.clip_config(64, zoo.vit_vision(32, 8, 64, 4, heads=4),
                                                zoo.text_tower(64, 2, heads=4)), features=32),
}


def get(name: str) -> ml_collections.ConfigDict:
  if name not in ZOO:
    raise ValueError(f'unknown LSeg variant {name!r}; choose one of {sorted(ZOO)}')
  return ZOO[name]()


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field and the fix for an inconsistent LSeg config."""
  if config.vision.get('kind') != 'vit':
    raise ValueError(f"model.vision.kind={config.vision.get('kind')!r}: LSeg's encoder is a ViT; use kind='vit'")
  zoo.validate(clip_config_of(config))
  p, layers, d = config.vision.patch_size, config.vision.layers, config.decoder
  if p < 1 or p & (p - 1):
    raise ValueError(f'model.vision.patch_size={p}: the DPT decoder resamples the token grid to strides 4..32 by '
                     'powers of two; use a power-of-two patch size (8, 16, 32)')
  hooks = tuple(d.hooks)
  if len(hooks) != 4 or any(not 0 <= h < layers for h in hooks):
    raise ValueError(f'model.decoder.hooks={hooks}: give 4 block indices in [0, {layers}) '
                     f'(model.vision.layers={layers})')
  if d.readout not in READOUTS:
    raise ValueError(f'model.decoder.readout={d.readout!r}: choose one of {READOUTS}')
  if len(d.dims) != 4 or min(d.dims) < 1 or d.features < 1:
    raise ValueError(f'model.decoder.dims={tuple(d.dims)} / features={d.features}: give 4 positive widths and a '
                     'positive feature width')
  r = config.spatial_reg
  if r.kind not in SPATIAL_REG_KINDS:
    raise ValueError(f'model.spatial_reg.kind={r.kind!r}: choose one of {SPATIAL_REG_KINDS}')
  if r.kind != 'none' and (r.depth < 1 or r.act not in SPATIAL_REG_ACTS):
    raise ValueError(f'model.spatial_reg: depth={r.depth} must be >= 1 and act={r.act!r} one of '
                     f'{sorted(SPATIAL_REG_ACTS)}')
  if not config.logit_scale > 0:
    raise ValueError(f'model.logit_scale={config.logit_scale}: use a positive scale (lang-seg: 1/0.07)')


def build(config: ml_collections.ConfigDict) -> LSeg:
  """The LSeg module of a validated `config`, its towers built exactly as CLIP's are."""
  validate(config)
  from clip_jax import models  # the CLIP builder; imported here as clip_jax.models imports this module
  towers = models.build(clip_config_of(config))
  d, r = config.decoder, config.spatial_reg
  return LSeg(vision=towers.vision, text=towers.text, embed_dim=config.embed_dim, hooks=tuple(d.hooks),
              readout=d.readout, dims=tuple(d.dims), features=d.features, use_bn=d.use_bn, spatial_reg=r.kind,
              spatial_reg_depth=r.depth, spatial_reg_act=r.act, logit_scale=config.logit_scale,
              dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


def init_from_clip(lseg_variables, clip_variables, towers: Sequence[str] = SHARED_TOWERS):
  """`lseg_variables` with `towers` ('vision', 'text') copied from a CLIP variables tree.

  Every parameter of LSeg's towers must exist in CLIP's with the same shape
  (build the CLIP model from `clip_config_of(lseg_config)`); CLIP parameters
  LSeg does not use (the ViT's ln_post and proj) are left out. Values are
  copied as they are (bitwise; cast only if the dtypes differ); boxed
  (logically partitioned) LSeg leaves stay boxed. Returns a new tree and
  raises ValueError listing every missing or mis-shaped parameter.
  """
  return transfer.copy_towers(lseg_variables, clip_variables, towers, 'LSeg', 'clip_config_of(lseg_config)')
