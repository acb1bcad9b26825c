"""bitsandbytes: 4-bit (nf4/fp4) and 8-bit Linear layers, their config and on-disk layout."""
