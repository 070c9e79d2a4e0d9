"""Write a SmolLM2-360M-shaped model folder with random weights, for memory measurements.

The offline asset package ships SmolLM2-135M only. Memory does not depend on the weights'
values, so `ray-s2p bench memory --set task.model=FOLDER` measures the 360M model's peak
resident set from this folder: SmolLM2-360M's published architecture (32 Llama blocks of
width 960, 15 query and 5 key-value heads, MLP 2,560, tied embeddings of 49,152 words) with
the 135M model's tokenizer (the family shares its vocabulary). Its accuracy means nothing.

    python jobs/smollm2_360m_shape.py runs/smollm2-360m-shape
"""

from __future__ import annotations

import argparse
from pathlib import Path

SMOLLM2_360M = dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                    num_key_value_heads=5, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True)


def main() -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ray_s2p.tasks.hf_models import seeded, smollm2_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write the model and tokenizer")
    folder = parser.parse_args().folder
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    config = LlamaConfig(**SMOLLM2_360M, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with seeded(0):
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"{folder}: {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
