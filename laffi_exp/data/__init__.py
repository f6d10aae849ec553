"""Dataset sources: the embedded synthetic generator and SQuAD-layout JSON files."""
