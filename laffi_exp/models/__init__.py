"""Base models: the embedded default (``embedded``) and any transformers causal LM (``pretrained``)."""
