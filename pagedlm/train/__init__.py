"""Training on the inference model code: the same modules, attention through the causal backend.

    model.py        trainable build (init, requires_grad, activation checkpointing), Batch, loss
    lora.py         trainable LoRA on the fused linear layers; PEFT adapter export; merge
    data.py         chat / prompt-completion / text JSONL, assistant-only masks, packing
    loop.py         AdamW + warmup/cosine, accumulation, clipping, eval, logs, checkpoints, resume,
                    DDP + ZeroRedundancyOptimizer under torchrun
    export.py       HF directories (config.json + model.safetensors + tokenizer) from a model
    tokenizer.py    byte-level BPE training (``pagedlm train-tokenizer``)
    commands.py     CLI: finetune, pretrain, train-tokenizer
"""
