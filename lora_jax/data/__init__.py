"""Input pipeline: load splits with `datasets`, tokenize (cached by `datasets`), bucket, batch, resume."""

from lora_jax.data.checks import DataError
from lora_jax.data.batching import TrainBatches, bucket_sizes, collate, eval_batches
from lora_jax.data.denoising import text_infilling
from lora_jax.data.sources import check_columns, load_splits, text_column_keys, tokenize
