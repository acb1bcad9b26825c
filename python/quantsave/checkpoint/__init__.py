"""The Hugging Face checkpoint folder format, with no backend knowledge: names, the reader, the
plan, the writer, the atomic commit and checksums."""
