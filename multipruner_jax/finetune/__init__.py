"""Recovery fine-tuning with LoRA: adapters, the training step, its data, the resumable run."""
