"""GGUF: the refused safetensors save, and .gguf files that keep each tensor's GGML type."""
