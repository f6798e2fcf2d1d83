"""The public config.json shapes of the models lora-dpo ships recipes for, so `lora-dpo estimate` can plan them on
a machine that cannot reach the hub (only the numbers memory depends on; tokenizers and weights still need the hub).
"""

from __future__ import annotations

# hub id → (model_type, config fields), as published in each model's config.json
KNOWN_CONFIGS: dict[str, tuple[str, dict]] = {
    "meta-llama/Llama-3.1-8B-Instruct": ("llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, tie_word_embeddings=False)),
    "mistralai/Mistral-7B-Instruct-v0.3": ("mistral", dict(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, tie_word_embeddings=False, sliding_window=None)),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, tie_word_embeddings=False)),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": ("llama", dict(
        vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=8192, tie_word_embeddings=True)),
}


def known_config(hub_id: str):
    """→ a transformers config with the published shapes of `hub_id`, or None if lora-dpo does not know it. The hub
    reads ids case-insensitively (meta-llama/llama-3.1-8b-instruct is the same model), and so does this."""
    known = {k.lower(): k for k in KNOWN_CONFIGS}.get(hub_id.strip().lower())
    if known is None:
        return None
    from transformers import AutoConfig

    model_type, fields = KNOWN_CONFIGS[known]
    return AutoConfig.for_model(model_type, **fields)
