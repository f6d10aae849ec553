"""The annotation app: a local web page over an exported batch, backed by a SQLite store
(``python -m laffi_exp.annotate serve`` and ``export-db``)."""
