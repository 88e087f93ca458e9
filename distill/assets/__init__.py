"""Demo assets shipped inside the package: tokenizer/, data/ (see NOTICE.md)."""
