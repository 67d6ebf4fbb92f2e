"""Builds a tiny random Llama and a WordLevel tokenizer offline, for the vLLM tests.

Nothing is downloaded: the weights are random (seeded), the tokenizer's vocabulary is
``w0 … w{V-1}`` plus specials. Outputs are meaningless but deterministic, which is all the
tests need: identical KV must give identical greedy tokens.

    python tiny_model.py OUT_DIR [--hidden 128] [--layers 2] [--vocab 512]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def build(out: str, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
          vocab: int = 512, intermediate: int | None = None, max_pos: int = 4096, seed: int = 0) -> str:
    stamp = os.path.join(out, "kvd-model.json")
    want = dict(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, vocab=vocab,
                intermediate=intermediate, max_pos=max_pos, seed=seed)
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == want:
                return out
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="bfloat16",
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = {w: i for i, w in enumerate(specials)}
    for i in range(vocab - len(specials)):
        words[f"w{i}"] = len(words)
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(out)
    with open(stamp, "w") as f:
        json.dump(want, f)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    args = ap.parse_args()
    build(args.out, args.hidden, args.layers, args.heads, args.kv_heads, args.vocab)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
