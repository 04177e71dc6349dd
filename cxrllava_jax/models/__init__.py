"""The Flax models. Every model returns one shape of result, big_vision's `(output, aux)`: the main output first,
then a dict of named auxiliary tensors (empty when there are none). This holds for `__call__` and for the methods
callers `apply` as entry points (`extend`, `step`, `cached_forward`, `logits_at`, `image_features`); the parts
that composite models call on their submodules (`embed`, `encode_images`, `hidden_states`, `Llama.logits`) return
one array.

| model                          | output                                   | aux                                          |
|--------------------------------|------------------------------------------|----------------------------------------------|
| `vit.VisionTransformer`        | contrastive embedding [batch, embed_dim] | pooled (before the projection), tokens (patches) |
| `vit.ViTClassifier`            | abnormality logits [batch] fp32          | probability, and the encoder's embedding, pooled, tokens |
| `bert.Bert`                    | last hidden states [batch, length, width] | pooler_output                               |
| `bert.TextEncoder`             | contrastive embedding [batch, embed_dim] | pooled (before the projection), tokens (BERT's hidden states) |
| `clip.ContrastiveModel`        | logits per image [images, texts] fp32    | image_embedding, text_embedding (L2-normalised), logit_scale |
| `cxr_llava.Projector`          | features in the LLM's width              | (none)                                       |
| `llama.Llama`, `cxr_llava.CXRLLaVAModel` | next-token logits fp32          | (none); `cache` from extend, step, cached_forward |
"""
