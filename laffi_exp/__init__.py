"""laffi_exp: the experiment pipeline for LaFFi (fine-tuning LMs to predict natural-language feedback)."""

__version__ = "0.4.0"  # bump when a change can alter a result: it is part of every cache key and run fingerprint
