"""Test setup: an 8-device CPU platform, set before JAX is imported anywhere."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# TensorFlow (tf.data tests) must not grab the accelerator or spam the log.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_config(name: str, arg=None):
  """`configs/<name>.py`'s get_config(arg), loaded as the CLI loads it."""
  spec = importlib.util.spec_from_file_location(f'configs_{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


@pytest.fixture(scope='session', autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, 'tests expect 8 host CPU devices (XLA_FLAGS was set too late?)'
