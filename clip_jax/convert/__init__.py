"""Conversion between clip_jax variables and the PyTorch ecosystem's checkpoints."""

from clip_jax.convert.hf_clip import from_hf_clip, hf_config, load_hf_clip, to_hf_clip
from clip_jax.convert.hf_groupvit import from_hf_groupvit, hf_groupvit_config, to_hf_groupvit
from clip_jax.convert.io import load
from clip_jax.convert.mapping import StateDictError
from clip_jax.convert.open_clip import from_open_clip, open_clip_model_cfg, to_open_clip

__all__ = ['from_hf_clip', 'hf_config', 'load_hf_clip', 'to_hf_clip', 'from_hf_groupvit', 'hf_groupvit_config',
           'to_hf_groupvit', 'load', 'StateDictError', 'from_open_clip', 'open_clip_model_cfg',
           'to_open_clip']
