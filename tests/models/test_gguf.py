from joules.models.gguf import hf_name


def test_block_and_top_level_names_map_to_hugging_face():
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("output.weight") == "lm_head.weight"


def test_unknown_names_pass_through():
    assert hf_name("blk.1.something_new.weight") == "blk.1.something_new.weight"
    assert hf_name("rope_freqs.weight") == "rope_freqs.weight"
