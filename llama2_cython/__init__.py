"""Python helpers shared by the tools around the extensions (export.py, tokenizer.py, train.py)."""
