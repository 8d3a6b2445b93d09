"""Named model architectures: the shape fields of config.model (k15.models.ModelConfig) for the experiment configs."""

ARCHITECTURES = {
    # Seconds-long CPU runs: smoke variants and tests.
    "tiny": dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                 rope_theta=10000.0, rms_norm_eps=1e-6, qkv_bias=True, tie_embeddings=True),
    # The main job's 0.6M-parameter Qwen2-style model of the arithmetic task.
    "arith": dict(vocab_size=128, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=384,
                  rope_theta=10000.0, rms_norm_eps=1e-6, qkv_bias=True, tie_embeddings=True),
    # Qwen2.5-Math-1.5B's config.json (the Math models' rope base is 1e4; Qwen2.5 general models use 1e6).
    "qwen2.5-math-1.5b": dict(vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2, head_dim=128,
                              d_ff=8960, rope_theta=10000.0, rms_norm_eps=1e-6, qkv_bias=True, tie_embeddings=True),
    # Qwen2.5-Math-7B's config.json: the vocab padded to 152,064, a separate lm_head.
    "qwen2.5-math-7b": dict(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128,
                            d_ff=18944, rope_theta=10000.0, rms_norm_eps=1e-6, qkv_bias=True, tie_embeddings=False),
    # Qwen2.5-7B-Instruct's config.json: the Math-7B shapes with a rope base of 1e6 and a 32,768-token context.
    "qwen2.5-7b": dict(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128,
                       d_ff=18944, rope_theta=1000000.0, rms_norm_eps=1e-6, qkv_bias=True, tie_embeddings=False),
}

