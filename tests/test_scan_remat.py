"""Scanned transformer stacks, rematerialisation policies and bf16 mixed precision.

Tolerances, and why:
  * scanned vs loop forward: 1e-6 max abs on the normalised float32
    features (the same arithmetic in a different loop; ~2e-7 measured).
  * stack/unstack round trip: bitwise.
  * remat vs 'none': loss and every gradient within 1e-6 of their own scale,
    computed in float64 (the causal text tower, a ModifiedResNet with its
    BatchNorm updates). In float32 under jit XLA
    fuses the recomputed forward differently and gradients move by ~3e-6 of
    their scale (measured): rounding that says nothing about remat. float64
    leaves only the LayerNorms' float32 statistics, so a real mistake (a
    dropped residual, a stale activation) stands out by orders of magnitude.
  * bf16 vs fp32 training loss: 2e-2 absolute over the first steps (bf16
    keeps 8 mantissa bits; see the test for the measured gap).
  * open_clip parity: 1e-4, as tests/test_clip_parity.py.
"""

import flax.linen as nn
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import ml_collections
import numpy as np
import open_clip
import pytest
import torch

from clip_jax import models, sharding
from clip_jax.convert import from_hf_clip, from_open_clip, hf_config, to_hf_clip, to_open_clip
from clip_jax.layers import remat as remat_lib
from clip_jax.losses import contrastive
from clip_jax.models import layout
from clip_jax.models.resnet import ModifiedResNet
from clip_jax.models.text import TextTransformer
from clip_jax.train import trainer
from parity_helpers import nhwc, perturb_, random_inputs, to_torch_state_dict
from trainer_helpers import tiny_config

POLICIES = [p for p in remat_lib.POLICIES if p != 'none']


def _tiny_config(scan_layers=False, remat='none'):
  """zoo 'tiny' with 3 vision layers (an odd depth keeps the stacking order honest) and short texts."""
  config = models.zoo.get('tiny')
  config.vision.layers = 3
  config.text.context_length = 8
  config.scan_layers = scan_layers
  config.remat = remat
  return config


def _inputs(config, batch=2):
  rng = np.random.default_rng(0)
  s, length, vocab = config.vision.image_size, config.text.context_length, config.text.vocab_size
  images = jnp.asarray(rng.standard_normal((batch, s, s, 3)), jnp.float32)
  tokens = rng.integers(1, vocab - 1, (batch, length))
  tokens[np.arange(batch), [length // 2, length - 1][:batch]] = vocab - 1  # EOT at different places
  return images, jnp.asarray(tokens, jnp.int32)


def _random_variables(init, *args, seed=0):
  """Random values in the shapes `init(rng, *args)` gives, without compiling the initialiser.

  These tests compare two computations on the same variables, so any values do;
  norm scales and BN variances stay near 1 so activations keep a sane scale.
  """
  abstract = nn.unbox(jax.eval_shape(init, jax.random.PRNGKey(0), *args))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    value = rng.standard_normal(leaf.shape) * 0.1
    if name in ("['scale']", "['var']"):
      value = 1.0 + np.abs(value)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope='module')
def loop():
  """(config, loop-layout variables, inputs) of the tiny model."""
  config = _tiny_config()
  images, tokens = _inputs(config)
  return config, _random_variables(models.build(config).init, images, tokens), (images, tokens)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- scanned layout ---------------------------------------------------------------------------------------------


def test_scanned_model_matches_loop_and_layouts_round_trip(loop):
  config, variables, (images, tokens) = loop
  scanned_config = _tiny_config(scan_layers=True)
  stacked = layout.stack_layers(variables, scanned_config)
  # The scanned model's own variables have exactly the stacked structure, shapes and dtypes.
  own = nn.unbox(jax.eval_shape(models.build(scanned_config).init, jax.random.PRNGKey(0), images, tokens))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), own) == jax.tree.map(lambda x: (x.shape, x.dtype), stacked)
  assert stacked['params']['vision']['transformer']['resblocks']['ln_1']['scale'].shape == (3, 64)
  assert stacked['params']['text']['transformer']['resblocks']['mlp']['c_fc']['kernel'].shape == (2, 64, 256)

  want = jax.jit(models.build(config).apply)(variables, images, tokens)
  got = jax.jit(models.build(scanned_config).apply)(stacked, images, tokens)
  for name, g, w in zip(('image', 'text'), got[:2], want[:2]):
    assert np.abs(np.asarray(g) - np.asarray(w)).max() < 1e-6, name
  _assert_trees_equal(layout.unstack_layers(stacked, scanned_config), variables)


def test_layout_refuses_the_wrong_layout(loop):
  config, variables, _ = loop
  stacked = layout.stack_layers(variables, config)
  with pytest.raises(ValueError, match='already in the scanned layout'):
    layout.stack_layers(stacked, config)
  with pytest.raises(ValueError, match='not the scanned layout'):
    layout.unstack_layers(variables, config)
  deeper = _tiny_config()
  deeper.text.layers = 3
  with pytest.raises(ValueError, match=r'params/text/transformer has blocks .* config has 3 layers'):
    layout.stack_layers(variables, deeper)
  with pytest.raises(ValueError, match=r'leading sizes \[2\] but the config has 3 layers'):
    layout.unstack_layers(stacked, deeper)
  with pytest.raises(ValueError, match='pass nn.unbox'):
    layout.stack_layers({'params': nn.Partitioned(np.zeros(2), ('embed',))}, config)


def test_open_clip_parity_and_export_with_scanned_layers():
  torch.manual_seed(0)

  def make():  # head width 64 in both towers, as from_open_clip assumes by default
    return open_clip.CLIP(
        embed_dim=32, quick_gelu=True,
        vision_cfg=open_clip.CLIPVisionCfg(layers=3, width=128, patch_size=8, image_size=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=16, vocab_size=500, width=64, heads=1, layers=2))

  reference = perturb_(make())
  config, variables = from_open_clip(reference.state_dict(), act='quick_gelu', scan_layers=True)
  assert config.scan_layers and set(variables['params']['vision']['transformer']) == {'resblocks'}
  images, tokens = random_inputs(config.vision.image_size, config.text.context_length, config.text.vocab_size)
  with torch.no_grad():
    want = (reference.encode_image(torch.from_numpy(images), normalize=True).numpy(),
            reference.encode_text(torch.from_numpy(tokens), normalize=True).numpy())
  got = jax.jit(models.build(config).apply)(variables, jnp.asarray(nhwc(images)), jnp.asarray(tokens, jnp.int32))
  for g, w in zip(got[:2], want):
    assert np.abs(np.asarray(g) - w).max() < 1e-4

  fresh = make().eval()
  fresh.load_state_dict(to_torch_state_dict(to_open_clip(config, variables)), strict=True)
  for name, tensor in reference.state_dict().items():
    np.testing.assert_array_equal(fresh.state_dict()[name].numpy(), tensor.numpy(), err_msg=name)


def test_hf_conversion_honours_scanned_configs(loop):
  config, variables, _ = loop
  scanned_config = _tiny_config(scan_layers=True)
  state_dict = to_hf_clip(config, variables)
  _assert_trees_equal(to_hf_clip(scanned_config, layout.stack_layers(variables, scanned_config)), state_dict)
  assert state_dict['logit_scale'].shape == ()  # exported with HF's shape, so our importer takes it back
  loop_config, loop_variables = from_hf_clip(state_dict, hf_config(config))
  got_config, got = from_hf_clip(state_dict, hf_config(config), scan_layers=True)
  assert got_config.scan_layers and not loop_config.scan_layers
  _assert_trees_equal(got, layout.stack_layers(loop_variables, got_config))


# --- rematerialisation ------------------------------------------------------------------------------------------

# The numerics run on the causal text tower in float64 (models.build allows only float32 and 16-bit
# floats); the ViT tower wraps the same Transformer, and the jaxpr test below sees its remat too.
_X64_CONFIG = ml_collections.ConfigDict(dict(
    vision=dict(kind='resnet'), text=dict(layers=2), scan_layers=True))  # what layout.* reads


def _text_tower(remat, scan_layers):
  return TextTransformer(context_length=6, vocab_size=100, width=32, layers=2, num_heads=2, mlp_dim=64,
                         output_dim=16, remat=remat, scan_layers=scan_layers, dtype=jnp.float64,
                         param_dtype=jnp.float64)


def _tower_tokens():
  return jnp.asarray(np.random.default_rng(1).integers(1, 100, (2, 6)), jnp.int32)


def _tower_loss_and_grads(remat, scan_layers, params):
  text, tokens = _text_tower(remat, scan_layers), _tower_tokens()
  # A loss whose gradient reaches every parameter, and a fixed projection of the features.
  loss = lambda p: jnp.sum(jnp.sin(text.apply({'params': p['text']}, tokens)) * jnp.arange(16))
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope='module')
def x64_reference():
  """float64 loop-layout params, and the loss and gradients with remat='none'."""
  with jax.enable_x64(True):
    params = {'text': _random_variables(_text_tower('none', False).init, _tower_tokens())['params']}
    return params, _tower_loss_and_grads('none', False, params)


def _assert_close_to_scale(got, want, rtol, what):
  """max |got - want| <= rtol * max |want|: a tolerance relative to each array's own scale."""
  got, want = np.asarray(got), np.asarray(want)
  scale = max(np.abs(want).max(), 1e-30)
  assert np.abs(got - want).max() <= rtol * scale, (what, np.abs(got - want).max() / scale)


@pytest.mark.parametrize('remat,scan_layers', [(p, False) for p in POLICIES] + [('full', True)])
def test_remat_policy_gives_the_same_loss_and_gradients(remat, scan_layers, x64_reference):
  """Against remat='none' in the loop layout; the scanned case also crosses layouts (stack, unstack)."""
  params, (want_loss, want_grads) = x64_reference
  with jax.enable_x64(True):
    if scan_layers:
      params = layout.stack_layers({'params': params}, _X64_CONFIG)['params']
    loss, grads = _tower_loss_and_grads(remat, scan_layers, params)
    if scan_layers:
      grads = layout.unstack_layers({'params': grads}, _X64_CONFIG)['params']
  assert loss.dtype == jnp.float64
  _assert_close_to_scale(loss, want_loss, 1e-6, 'loss')
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
    _assert_close_to_scale(g, w, 1e-6, jax.tree_util.keystr(path))


def _primitive_names(jaxpr) -> set:
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax_core.jaxprs_in_params(eqn.params):
      names |= _primitive_names(sub)
  return names


@pytest.mark.parametrize('scan_layers', [False, True], ids=['loop', 'scan'])
def test_remat_config_rematerialises_and_saves_less(loop, scan_layers):
  """From the config: the grad's jaxpr holds a remat primitive, and the residuals kept for
  the backward pass shrink as the policy saves less (measured by shape: nothing runs)."""
  _, variables, (images, tokens) = loop
  if scan_layers:
    variables = layout.stack_layers(variables, _tiny_config(scan_layers=True))
  saved = {}
  for policy in remat_lib.POLICIES:
    model = models.build(_tiny_config(scan_layers, policy))
    loss = lambda p, m=model: contrastive.softmax_loss(*m.apply({'params': p}, images, tokens))
    names = _primitive_names(jax.make_jaxpr(jax.grad(loss))(variables['params']).jaxpr)
    assert bool(names & {'checkpoint', 'remat', 'remat2'}) == (policy != 'none'), (policy, sorted(names))
    residuals = jax.eval_shape(lambda p, f=loss: jax.vjp(f, p)[1], variables['params'])
    saved[policy] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))
  assert saved['full'] < saved['dots_no_batch'] < saved['dots'] < saved['none'], saved


def test_resnet_remat_matches_none_with_batch_norm_updates():
  """Per-bottleneck remat in train mode: the same loss, gradients and BatchNorm statistics."""
  with jax.enable_x64(True):
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float64)
    kw = dict(image_size=32, layers=(1, 1, 1, 1), width=8, output_dim=16, num_heads=2, dtype=jnp.float64,
              param_dtype=jnp.float64)
    variables = _random_variables(ModifiedResNet(**kw).init, images)

    def value_and_grad(remat, p):
      model = ModifiedResNet(remat=remat, **kw)

      def loss(params):
        out, updates = model.apply({**variables, 'params': params}, images, train=True, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(out)), updates

      return jax.value_and_grad(loss, has_aux=True)(p)

    # One jit for both: a third less compile time than two.
    both = jax.jit(lambda p: (value_and_grad('none', p), value_and_grad('full', p)))
    ((want_loss, want_stats), want_grads), ((loss, stats), grads) = both(variables['params'])
    remat_jaxpr = jax.make_jaxpr(lambda p: value_and_grad('full', p))(variables['params']).jaxpr
  assert 'remat2' in _primitive_names(remat_jaxpr) or 'checkpoint' in _primitive_names(remat_jaxpr)
  _assert_close_to_scale(loss, want_loss, 1e-6, 'loss')
  for g, w in zip(jax.tree.leaves((grads, stats)), jax.tree.leaves((want_grads, want_stats))):
    _assert_close_to_scale(g, w, 1e-6, 'gradient or batch statistic')


# --- the trainer: bf16 mixed precision, scanned parameters on a mesh --------------------------------------------


def _random_batch(s, seed=0):
  """A global batch of the shapes the step takes: uint8 images, token rows ending in EOT."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, spec in trainer.abstract_batch(s).items():
    if key == 'tokens':
      vocab = s.config.model.text.vocab_size
      value = rng.integers(1, vocab - 1, spec.shape)
      value[:, -1] = vocab - 1
    else:
      value = rng.integers(0, 256, spec.shape)
    out[key] = value.astype(spec.dtype)
  return trainer.global_batch(s.mesh, out)


def _dot_operand_dtypes(jaxpr) -> set:
  out = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      out.add(tuple(str(v.aval.dtype) for v in eqn.invars))
    for sub in jax_core.jaxprs_in_params(eqn.params):
      out |= _dot_operand_dtypes(sub)
  return out


# Data 2, FSDP 2, tensor 2: every parameter axis rule (embed -> fsdp, mlp/heads -> tensor) is in play.
_MESH = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}


def test_scanned_params_shard_like_the_loop_with_layers_replicated():
  loop_setup = trainer.setup(tiny_config(**_MESH))
  s = trainer.setup(tiny_config(**_MESH, **{'model.scan_layers': True}))
  for tower in ('vision', 'text'):
    scanned = jax.tree.map(lambda x: tuple(x.spec), s.state_shardings.params[tower]['transformer']['resblocks'])
    per_layer = loop_setup.state_shardings.params[tower]['transformer']['resblocks_0']
    assert scanned == jax.tree.map(lambda x: (None,) + tuple(x.spec), per_layer)
  kernel = s.state_shardings.params['text']['transformer']['resblocks']['mlp']['c_fc']['kernel']
  assert tuple(kernel.spec) == (None, 'fsdp', 'tensor')  # [layers, embed, mlp]
  suffix = "['text']['transformer']['resblocks']['mlp']['c_fc']['kernel']"
  moments = [x for path, x in jax.tree_util.tree_leaves_with_path(s.state_shardings.opt_state)
             if jax.tree_util.keystr(path).endswith(suffix)]
  assert len(moments) == 2 and all(m.spec == kernel.spec for m in moments)  # Adam's mu and nu


def test_bf16_train_steps_keep_float32_state_and_track_the_fp32_loss():
  """bf16 compute through the trainer's step, with the options a large run combines (scanned
  layers, remat, a 2x2x2 mesh). The reference is the fp32 model's loss on the same parameters and
  batch at every step: a forward pass, where a second trainer step would double the compile time."""
  s = trainer.setup(tiny_config(**_MESH, **{'model.dtype': 'bfloat16', 'model.scan_layers': True,
                                            'model.remat': 'dots'}))
  fp32 = trainer.setup(tiny_config(**_MESH, **{'model.scan_layers': True}))
  fp32_loss = jax.jit(lambda params, batch: fp32.objective(fp32.model, {'params': params}, batch, train=True,
                                                         rngs={})[0])
  step_fn = trainer.jit_step(s)
  got, want = [], []
  with sharding.use(s.mesh, s.rules):
    state = s.init_state(jax.random.PRNGKey(0))
    jax.tree.map(lambda x, want: x.sharding.is_equivalent_to(want, x.ndim) or pytest.fail(str(x.sharding)),
                 state, s.state_shardings)  # born sharded
    for i in range(3):
      batch = _random_batch(s, seed=i)
      want.append(float(fp32_loss(state.params, batch)))
      state, metrics = step_fn(state, batch)  # its loss is that of the parameters before the update
      got.append(float(metrics['loss']))
    jaxpr = jax.make_jaxpr(step_fn)(state, batch).jaxpr

  floats = lambda tree: {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
  assert floats(state.params) == {jnp.dtype('float32')}
  assert floats(state.opt_state) == {jnp.dtype('float32')}  # Adam's moments included
  assert bool(metrics['step_applied']) and np.all(np.isfinite(got))
  # Measured: max |bf16 - fp32| = 6.0e-3 on losses of 3.22-3.29 (random images) over these steps.
  np.testing.assert_allclose(got, want, atol=2e-2)
  # The tower matmuls take bf16 operands (float32 params cast where used); the logits stay float32.
  dots = _dot_operand_dtypes(jaxpr)
  assert ('bfloat16', 'bfloat16') in dots and ('float32', 'float32') in dots, dots


# --- validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('field,value,match', [
    ('remat', 'everything', r"model.remat='everything' is not a remat policy; use one of \['dots', 'dots_no_batch', "
                            r"'full', 'none'\]"),
    ('scan_layers', None, r'model.scan_layers=None: use True .* or False'),
])
def test_bad_remat_and_scan_configs_are_named(field, value, match):
  config = models.zoo.get('tiny')
  config[field] = value
  with pytest.raises(ValueError, match=match):
    models.build(config)


def test_configs_without_the_new_fields_build_as_before():
  config = models.zoo.get('tiny')
  del config['remat']
  del config['scan_layers']
  model = models.build(config)
  assert model.vision.remat == 'none' and not model.text.scan_layers
