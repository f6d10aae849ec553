"""laffi_exp: the experiment pipeline for LaFFi (fine-tuning LMs to predict natural-language feedback)."""

__version__ = "0.1.0"
