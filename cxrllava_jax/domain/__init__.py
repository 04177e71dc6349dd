"""What the project knows about chest radiographs and their reports, shared by data, training, inference and
evaluation: the findings vocabulary, the release's prompts and chat format, the tokenizer, the report labeler
and its file formats, and image decoding and preprocessing. Imports only `cxrllava_jax.models` and the
project-wide modules below it, never the packages that use it."""
