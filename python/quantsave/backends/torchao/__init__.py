"""torchao: tensor-subclass weights in torchao's flattened safetensors form."""
