"""One client's work, without Flower: its data (load, validate, split, tokenise), the base model and
its LoRA, micro-batches and the loss, masked local training and evaluation, the hardware choices
(precision, compile, oneDNN), and `task.ClientTask`, which ties them together for the apps."""
