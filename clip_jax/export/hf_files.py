"""The processor files of a Hugging Face export: CLIP's BPE as vocab.json / merges.txt (plus the
fast tokenizer.json transformers derives from them), special tokens, and preprocessor_config.json
with the model's image size and CLIP's mean/std, so `CLIPProcessor.from_pretrained(DIR)` works offline.
"""

import json
import os

from clip_jax.data import tokenizer, transforms

# Hugging Face spells CLIP's special tokens as OpenAI did; the ids are the same (49406, 49407).
_HF_SPECIAL = {'<start_of_text>': '<|startoftext|>', '<end_of_text>': '<|endoftext|>'}


def _write_bpe(directory: str) -> tuple[str, str]:
  symbols, merges = tokenizer.vocabulary()
  vocab_file, merges_file = os.path.join(directory, 'vocab.json'), os.path.join(directory, 'merges.txt')
  with open(vocab_file, 'w', encoding='utf-8') as f:
    json.dump({_HF_SPECIAL.get(s, s): i for i, s in enumerate(symbols)}, f, ensure_ascii=False)
  with open(merges_file, 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + '\n'.join(f'{a} {b}' for a, b in merges) + '\n')
  return vocab_file, merges_file


def write_processor(directory: str, image_size: int, context_length: int) -> None:
  """Tokenizer + image-processor files of `CLIPProcessor` into `directory`, which already holds the
  model's config.json (transformers reads the tokenizer class from it)."""
  from transformers import AutoTokenizer, CLIPImageProcessor, CLIPProcessor  # pylint: disable=g-import-not-at-top
  _write_bpe(directory)
  # From the files, as transformers loads CLIP's own: the same call builds the right class in v4 and v5.
  tok = AutoTokenizer.from_pretrained(directory, model_max_length=context_length, bos_token='<|startoftext|>',
                                      eos_token='<|endoftext|>', unk_token='<|endoftext|>', pad_token='<|endoftext|>',
                                      local_files_only=True)
  images = CLIPImageProcessor(size={'shortest_edge': image_size}, crop_size={'height': image_size, 'width': image_size},
                              image_mean=list(transforms.MEAN), image_std=list(transforms.STD))
  CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(directory)
