"""Export a training run for the evaluation tools people already use.

  python -m clip_jax.export --workdir RUN [--step N] --format open_clip|hf|safetensors --out DIR [--force]

  open_clip    DIR/open_clip_model.safetensors + DIR/open_clip_config.json (model_cfg, preprocess_cfg):
               open_clip.create_model_and_transforms('local-dir:DIR'); the bare model_cfg is also in
               DIR/clip_jax_export.json, for open_clip.add_model_config(that file) and then
               create_model_and_transforms('clip_jax_export', pretrained='DIR/open_clip_model.safetensors').
               CLIP ViT and ModifiedResNet models.
  hf           a transformers directory: config.json, model.safetensors and CLIPProcessor's files
               (CLIPModel.from_pretrained(DIR), CLIPProcessor.from_pretrained(DIR)). CLIP ViT and GroupViT.
  safetensors  DIR/clip_jax_model.safetensors: the variables bitwise under '/'-joined keys, the model
               config as JSON metadata (clip_jax.convert.raw.load). Any model.

Each format loads back as a run's starting point: config.init.open_clip / .hf / .safetensors
(clip_jax.train.pretrained).
"""

from clip_jax.export.writers import FORMATS, ExportError, export, write

__all__ = ['FORMATS', 'ExportError', 'export', 'write']
