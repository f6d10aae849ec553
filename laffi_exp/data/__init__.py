"""Dataset sources: the embedded synthetic generator and SQuAD-layout JSON files (each a
:class:`laffi_exp.data.base.DataSource`)."""
