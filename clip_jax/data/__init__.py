"""Input pipelines (tf.data, grain), transforms, the tokenizer and the embedded digits dataset."""
