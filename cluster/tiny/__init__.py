"""The tiny model made offline: `raylora make-tiny` (checkpoint, tokenizer, PEFT adapters)."""
