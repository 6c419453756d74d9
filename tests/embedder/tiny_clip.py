"""A tiny, randomly initialised CLIP checkpoint in the real `save_pretrained` format.

Built locally (no hub): CLIPConfig with tiny towers, a byte-level BPE tokenizer with a
small vocabulary (vocab.json + merges.txt, exactly the files CLIP ships) and a CLIP image
processor. The embedder loads it through the same code as a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP's reversible byte -> printable unicode table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def build_tiny_clip(
    path: Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    projection_dim: int = 16,
    vision_hidden: int | None = None,
    vision_layers: int | None = None,
    vision_heads: int | None = None,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    words = ["a", "the", "photo", "of", "cat", "dog", "red", "car", "warm-up"]
    merges: list[tuple[str, str]] = []
    vocab_tokens = chars + [c + "</w>" for c in chars]
    for word in words:  # merge each word left to right so it becomes one token
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            merged = symbols[0] + symbols[1]
            if merged not in vocab_tokens:
                vocab_tokens.append(merged)
            symbols = [merged, *symbols[2:]]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )
    # Loading the two files the way a real checkpoint is loaded works across
    # transformers versions (4.x slow/fast and 5.x tokenizers-backed classes).
    tokenizer = CLIPTokenizer.from_pretrained(path, model_max_length=77)
    tokenizer.save_pretrained(path)

    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": hidden,
            "intermediate_size": hidden * (4 if vision_hidden else 2),
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "max_position_embeddings": 77,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": vision_hidden or hidden,
            "intermediate_size": (vision_hidden or hidden) * (4 if vision_hidden else 2),
            "num_hidden_layers": vision_layers or layers,
            "num_attention_heads": vision_heads or heads,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(path)
    return path


def build_clip_b32_sized(path: Path, seed: int = 0) -> Path:
    """Random weights with the tower shapes of CLIP ViT-B/32 (small vocabulary): for speed benchmarks."""
    return build_tiny_clip(
        path,
        hidden=512,
        layers=12,
        heads=8,
        projection_dim=512,
        vision_hidden=768,
        vision_layers=12,
        vision_heads=12,
        image_size=224,
        patch_size=32,
        seed=seed,
    )
