"""Write a tiny random-weight llama model in GGUF (the `gguf` package, llama.cpp's own writer), for tests and
the local example: no model hub is reachable here. Deterministic for a seed, so its sha256 is stable.

    python3 examples/llm/tinymodel.py OUT.gguf [--seed N]

A sentencepiece-style ("llama") vocabulary: <unk>, <s>, </s>, the 256 byte tokens, a few hundred word
pieces. `tiny`: 2 layers, 64 wide: it answers gibberish, fast, through the real llama.cpp code path.
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

import numpy as np

N_CTX = 512
# --size small: ~25 M parameters (100 MB f32), for benchmarks where per-token work should dominate.
# --size medium: ~57 M parameters (230 MB f32): tens of tokens/s on one CPU core, a model's pace
# rather than a toy's (bench/bench_ai.py --models medium).
SIZES = {"tiny": (64, 2, 4, 128), "small": (512, 8, 8, 1376), "medium": (768, 8, 12, 2048)}


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]  # UNKNOWN, CONTROL
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(6)  # BYTE
    pieces = ["▁" + c for c in string.ascii_lowercase] + list(string.ascii_lowercase)
    pieces += ["▁the", "▁a", "▁is", "▁of", "▁and", "▁to", "▁in", "▁hello", "▁world", "▁model", "."]
    pieces += [a + b for a in "etaoinshr" for b in "etaoinshr"]
    for i, p in enumerate(dict.fromkeys(pieces)):
        tokens.append(p)
        scores.append(-float(i))
        types.append(1)  # NORMAL
    return tokens, scores, types


def write_tiny_llama(path: Path, *, seed: int = 0, size: str = "tiny") -> Path:
    import gguf

    n_embd, n_layer, n_head, n_ff = SIZES[size]

    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("teecloud-tiny-llama")
    w.add_context_length(N_CTX)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def t(name: str, *shape: int, ones: bool = False) -> None:
        data = np.ones(shape, np.float32) if ones else (rng.standard_normal(shape) * 0.02).astype(np.float32)
        w.add_tensor(name, data)

    t("token_embd.weight", n_vocab, n_embd)
    for i in range(n_layer):
        t(f"blk.{i}.attn_norm.weight", n_embd, ones=True)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(f"blk.{i}.{name}.weight", n_embd, n_embd)
        t(f"blk.{i}.ffn_norm.weight", n_embd, ones=True)
        t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    t("output_norm.weight", n_embd, ones=True)
    t("output.weight", n_vocab, n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = ap.parse_args()
    print(write_tiny_llama(args.out, seed=args.seed, size=args.size))
