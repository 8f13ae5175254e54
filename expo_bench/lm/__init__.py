"""Language-model preference data and models: HH-RLHF pairs, tokenization into the batch contract, causal LMs."""
