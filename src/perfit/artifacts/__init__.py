"""The files a run reads and writes around the method: the base model (resolved, dequantized once,
fingerprinted) and LoRA adapters (peft's config, the flat layout of a model's LoRA tensors, the PEFT
adapter format). Shared by the client, the server and the owner tools; no training here."""
