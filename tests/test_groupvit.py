"""GroupViT: parity with transformers' GroupViTModel, conversion, gradients, sharding, config errors.

Tolerances: embeddings and soft assignment maps within 1e-4 max abs of the
random-initialised (perturbed) float32 reference; hard maps exactly equal
(same argmax everywhere); a strict-loaded round trip within 1e-6; the
sharded forward within 1e-5 of the single-device one.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GroupViTConfig, GroupViTModel

from clip_jax import models, sharding
from clip_jax.convert import StateDictError, from_hf_groupvit, hf_groupvit_config, to_hf_groupvit
from clip_jax.convert.hf_groupvit import config_from_hf
from clip_jax.losses import grouping as grouping_loss
from clip_jax.models import groupvit_zoo
from parity_helpers import nhwc, perturb_, random_inputs, to_torch_state_dict

TOL = 1e-4

# Not HF's defaults anywhere: 36 patches -> 8 groups -> 4, a plain last stage, an MLP ratio of 3 in the
# encoder, assign_eps 0.5, token-mixer / channel-MLP ratios (0.75, 2), narrow towers, first-eos pooling.
HF_CONFIG = dict(
    projection_dim=40, projection_intermediate_dim=96, logit_scale_init_value=2.3,
    text_config=dict(vocab_size=1000, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=16, eos_token_id=999, bos_token_id=998,
                     pad_token_id=0),
    vision_config=dict(hidden_size=64, intermediate_size=192, depths=[2, 1, 1], num_hidden_layers=4,
                       num_group_tokens=[8, 4, 0], num_output_groups=[8, 4, 4], num_attention_heads=4,
                       image_size=48, patch_size=8, assign_eps=0.5, assign_mlp_ratio=[0.75, 2]))


def _hf_outputs(model, images, tokens):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(images), output_attentions=True)
    tokens_out = out.vision_model_output.last_hidden_state
    groups = model.visual_projection(tokens_out.reshape(-1, tokens_out.shape[-1])).reshape(*tokens_out.shape[:2], -1)
  return dict(image=out.image_embeds.numpy(), text=out.text_embeds.numpy(), scale=model.logit_scale.exp().item(),
              soft=[a.numpy() for a in out.vision_model_output.attentions],
              groups=torch.nn.functional.normalize(groups, dim=-1).numpy())


@pytest.fixture(scope='module')
def reference():
  torch.manual_seed(0)
  hf = GroupViTConfig(**HF_CONFIG)
  model = perturb_(GroupViTModel(hf))
  images, tokens = random_inputs(48, 16, 1000, batch=3)
  config, variables = from_hf_groupvit(model.state_dict(), hf.to_dict())
  return dict(model=model, hf=hf, images=images, tokens=tokens, config=config, variables=variables,
              want=_hf_outputs(model, images, tokens))


def _forward(model, images, tokens):
  """`__call__`'s outputs and encode_image's assignment maps, in one `apply` (one compile)."""
  return model(images, tokens), model.encode_image(images, normalize=True, return_attentions=True)[1]


def _ours(config, variables, images, tokens):
  apply = jax.jit(lambda v, i, t: models.build(config).apply(v, i, t, method=_forward))
  (img, txt, scale), aux = apply(variables, jnp.asarray(nhwc(images)), jnp.asarray(tokens, jnp.int32))
  return img, txt, scale, aux


def test_hf_parity_embeddings_and_assignment_maps(reference):
  want = reference['want']
  img, txt, scale, aux = _ours(reference['config'], reference['variables'], reference['images'], reference['tokens'])
  assert np.abs(np.asarray(img) - want['image']).max() < TOL
  assert np.abs(np.asarray(txt) - want['text']).max() < TOL
  np.testing.assert_allclose(float(scale), want['scale'], rtol=1e-6)
  assert [a.shape for a in aux['soft']] == [(3, 8, 36), (3, 4, 8)] == [a.shape for a in want['soft']]
  for soft, hard, ref in zip(aux['soft'], aux['hard'], want['soft']):
    assert np.abs(np.asarray(soft) - ref).max() < TOL
    # Eval assignment is the argmax over the group axis: one-hot, and where HF's is.
    hard = np.asarray(hard)
    assert set(np.unique(hard)) == {0.0, 1.0} and (hard.sum(1) == 1).all()
    np.testing.assert_array_equal(hard.argmax(1), ref.argmax(1))
  # Per-segment embeddings, as HF's segmentation path projects them.
  assert np.abs(np.asarray(aux['group_features']) - want['groups']).max() < TOL


def test_hf_round_trip_loads_strictly(reference):
  config, variables = reference['config'], reference['variables']
  fresh = GroupViTModel(GroupViTConfig(**hf_groupvit_config(config))).eval()
  fresh.load_state_dict(to_torch_state_dict(to_hf_groupvit(config, variables)), strict=True)
  again = _hf_outputs(fresh, reference['images'], reference['tokens'])
  for key in ('image', 'text', 'groups'):
    np.testing.assert_allclose(again[key], reference['want'][key], atol=1e-6)
  for a, b in zip(again['soft'], reference['want']['soft']):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert config_from_hf(GroupViTConfig(**hf_groupvit_config(config)).to_dict()).to_dict() == config.to_dict()


def test_state_dict_errors_list_the_keys(reference):
  sd = dict(reference['model'].state_dict())
  broken = dict(sd)
  del broken['vision_model.encoder.stages.1.group_token']
  broken['vision_model.extra.weight'] = torch.zeros(3)
  with pytest.raises(StateDictError) as err:
    from_hf_groupvit(broken, reference['hf'].to_dict())
  assert 'missing keys (1): vision_model.encoder.stages.1.group_token' in str(err.value)
  assert 'unexpected keys (1): vision_model.extra.weight' in str(err.value)
  misshaped = dict(sd)
  misshaped['vision_model.encoder.stages.0.downsample.mlp_inter.fc1.weight'] = torch.zeros(48, 7)
  with pytest.raises(StateDictError, match=r'mis-shaped keys \(1\): .*mlp_inter.fc1.weight: \[\(48, 7\)\]'):
    from_hf_groupvit(misshaped, reference['hf'].to_dict())


def test_paper_config_is_hf_default_architecture():
  config = groupvit_zoo.get('groupvit-gcc-yfcc')
  assert config_from_hf(GroupViTConfig().to_dict()).to_dict() == config.to_dict()
  with torch.device('meta'):  # shapes only
    reference = GroupViTModel(GroupViTConfig(**hf_groupvit_config(config)))
  params = dict(models.abstract_variables(config)['params'])
  # The multi-label loss's own temperature is a training-only scalar HF's inference model drops.
  assert params.pop('multi_label_logit_scale').shape == ()
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert ours == sum(p.numel() for p in reference.parameters())


@pytest.fixture(scope='module')
def tiny():
  """The tiny zoo model, a batch of 8, its variables and single-device outputs.

  The variables come from a perturbed HF model of the same shape: converting costs no XLA compile
  (a jitted init is ~15 s of CPU here) and checks the zoo config converts.
  """
  torch.manual_seed(1)
  config = groupvit_zoo.get('tiny')
  hf = GroupViTConfig(**hf_groupvit_config(config))
  converted, variables = from_hf_groupvit(perturb_(GroupViTModel(hf)).state_dict(), hf.to_dict())
  assert converted.to_dict() == config.to_dict()
  model = models.build(config)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((8, 32, 32, 3)), jnp.float32)
  tokens = rng.integers(1, 1000, (8, 77)).astype(np.int32)
  tokens[:, 9] = 49407
  tokens = jnp.asarray(tokens)
  want = jax.jit(lambda v, i, t: model.apply(v, i, t, method=_forward))(variables, images, tokens)
  return dict(config=config, model=model, images=images, tokens=tokens, variables=variables, want=want)


def test_straight_through_gradients_reach_group_tokens_and_assignment_logits(tiny):
  """The assignment's q/k only shape the logits, whose forward use is a hard argmax: any gradient
  they get comes through the straight-through softmax."""
  model, images, variables = tiny['model'], tiny['images'], tiny['variables']
  target = jax.random.normal(jax.random.PRNGKey(1), (8, tiny['config'].embed_dim))

  def loss(params, key):
    img, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, images, train=True,
                         rngs={'gumbel': key}, mutable=['batch_stats'], method='encode_image')
    return jnp.sum(img * target)

  grads = nn.unbox(jax.jit(jax.grad(loss))(variables['params'], jax.random.PRNGKey(2)))['vision']
  for stage in ('stages_0', 'stages_1'):
    for path in (('group_token',), ('grouping', 'assign', 'q', 'kernel'), ('grouping', 'assign', 'k', 'kernel')):
      g = grads[stage]
      for p in path:
        g = g[p]
      g = np.asarray(g)
      assert np.isfinite(g).all() and np.abs(g).max() > 0, (stage, path)

  # Training draws fresh Gumbel noise per key (the eval map is the noise-free argmax).
  hard = jax.jit(lambda key: model.apply(variables, images, train=True, return_attentions=True,
                                         rngs={'gumbel': key}, mutable=['batch_stats'],
                                         method='encode_image')[0][1]['hard'][0])
  assert not np.array_equal(np.asarray(hard(jax.random.PRNGKey(3))), np.asarray(hard(jax.random.PRNGKey(4))))
  with pytest.raises(ValueError, match="rngs=\\{'gumbel': key\\}"):
    jax.eval_shape(lambda: model.apply(variables, images, train=True, mutable=['batch_stats'],
                                       method='encode_image'))


def test_every_parameter_has_logical_axes(tiny):
  boxed = jax.eval_shape(tiny['model'].init, jax.random.PRNGKey(0), tiny['images'], tiny['tokens'])['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim for x in leaves)


@pytest.mark.parametrize('mesh_shape', [(1, 8, 1), (2, 1, 4)], ids=['fsdp8', 'data2xtensor4'])
def test_sharded_forward_equals_unsharded(tiny, mesh_shape):
  model, images, tokens, variables = tiny['model'], tiny['images'], tiny['tokens'], tiny['variables']

  mesh = sharding.make_mesh(*mesh_shape)
  shardings = sharding.variables_sharding(model, mesh, images, tokens)
  placed = jax.device_put(nn.unbox(variables), shardings)
  assert any(any(a is not None for a in s.spec) for s in jax.tree.leaves(shardings)), 'nothing was sharded'
  with sharding.use(mesh):  # a fresh trace, so the activation constraints apply
    got = jax.jit(lambda v, i, t: model.apply(v, i, t, method=_forward))(
        placed, jax.device_put(images, sharding.batch_sharding(mesh, 4)),
        jax.device_put(tokens, sharding.batch_sharding(mesh, 2)))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(tiny['want'])):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


@pytest.mark.parametrize('field,value,match', [
    ('vision.patch_size', 5, r'model.vision.image_size=32 is not divisible by model.vision.patch_size=5'),
    ('vision.num_output_groups', (6, 4, 4), r'model.vision.num_output_groups\[0\]=6 does not chain with '
                                            r'num_group_tokens\[0\]=8.*set num_output_groups\[0\]=8'),
    ('vision.num_group_tokens', (8, 4), r'one entry per stage'),
    ('vision.heads', 3, r'model.vision.width=64 is not divisible by model.vision.heads=3'),
])
def test_bad_configs_are_named(field, value, match):
  config = groupvit_zoo.get('tiny')
  node, _, leaf = field.rpartition('.')
  config[node][leaf] = value
  with pytest.raises(ValueError, match=match):
    models.build(config)


def test_chaining_follows_hf():
  """Stage i's output groups need not equal stage i+1's group tokens (the paper's 64 -> 8 does not);
  what HF needs is that a group projector's input (num_output_groups[i]) is stage i's group-token count."""
  config = groupvit_zoo.get('tiny')
  config.vision.num_output_groups = (8, 3, 3)  # 8 -> 4 group tokens, 3 output segments
  groupvit_zoo.validate(config)


def test_gumbel_off_trains_on_the_noise_free_argmax(tiny):
  """vision.gumbel=False: training's hard map is the eval argmax whatever the key, with the same
  straight-through gradients (a training choice: the parameters and eval outputs are unchanged)."""
  config = tiny['config'].copy_and_resolve_references()
  config.vision.gumbel = False
  model, images, variables = models.build(config), tiny['images'], tiny['variables']
  maps = jax.jit(lambda key, train: model.apply(variables, images, train=train, return_attentions=True,
                                                rngs={'gumbel': key}, mutable=['batch_stats'],
                                                method='encode_image')[0][1]['hard'], static_argnums=1)
  eval_hard = [np.asarray(h) for h in maps(jax.random.PRNGKey(0), False)]
  for key in (3, 4):
    for got, want in zip(maps(jax.random.PRNGKey(key), True), eval_hard):
      np.testing.assert_array_equal(np.asarray(got), want)
  # No 'gumbel' stream needed.
  jax.eval_shape(lambda: model.apply(variables, images, train=True, mutable=['batch_stats'], method='encode_image'))


def test_load_balance_is_one_when_spread_and_g_when_collapsed():
  g, length = 4, 8
  spread = jax.nn.one_hot(jnp.arange(length) % g, g, axis=0)[None]     # [1, G, L], two tokens per group
  collapsed = jax.nn.one_hot(jnp.zeros(length, int), g, axis=0)[None]  # every token in group 0
  assert float(grouping_loss.load_balance(spread, spread)) == pytest.approx(1.0)
  assert float(grouping_loss.load_balance(collapsed, collapsed)) == pytest.approx(g)
  # Near-uniform soft maps with a collapsed hard map (what a short run shows): the value is about 1,
  # and the gradient lowers every token's logit for the group that took them all, and only that one.
  logits = 0.01 * jax.random.normal(jax.random.PRNGKey(0), (1, g, length))
  logits = logits.at[:, 0].add(0.1)
  value, grad = jax.value_and_grad(
      lambda z: grouping_loss.load_balance(jax.nn.softmax(z, axis=1), collapsed))(logits)
  assert float(value) == pytest.approx(g * float(jax.nn.softmax(logits, axis=1)[0, 0].mean()), rel=1e-6)
  grad = np.asarray(grad)[0]
  assert (grad[0] > 0).all() and (grad[1:] < 0).all()  # descent: group 0 down, the others up
  with pytest.raises(ValueError, match=r'must both be \[B, G, L\]'):
    grouping_loss.load_balance(spread, spread[0])
  assert float(grouping_loss.largest_group_share(spread)) == pytest.approx(1 / g)
  assert float(grouping_loss.largest_group_share(collapsed)) == pytest.approx(1.0)


def test_group_balance_task_needs_a_groupvit():
  from clip_jax import tasks  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from clip_jax.models import zoo  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(model=zoo.get('tiny'), tasks=dict(group_balance=dict(weight=0.1))))
  with pytest.raises(ValueError, match=r"group_balance balances GroupViT's grouping stages; model.name='clip'"):
    tasks.build_objective(config)
  config.tasks.group_balance.strength = 2
  with pytest.raises(ValueError, match=r"unknown options \['strength'\]; it takes only `weight`"):
    tasks.build_objective(config)
