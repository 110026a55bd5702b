"""Tiny, fully local Qwen2 model + tokenizer for tests and CPU benchmarks.

Why a character-level (byte-level, no merges) tokenizer:
- no model hub: everything is built here from a config and a seed, then saved and loaded back
  through the real ``AutoTokenizer.from_pretrained`` / ``AutoModelForCausalLM.from_pretrained``
  path, exactly as a real checkpoint would be;
- tiny vocab (259 ids: 3 special tokens, then one token per byte value, id = 3 + byte), so a
  2-layer, 64-wide model runs in milliseconds on CPU;
- exact round trip text <-> ids: every ASCII character is exactly one token (other characters
  are their UTF-8 bytes), so ``decode(encode(text)) == text`` for any NFC-normalised text and
  tests can compare ids and strings without tokenizer ambiguity.
The pre/post-processing is Qwen2's own (NFC, Qwen2's split regex, byte-level mapping), because
transformers 5 rebuilds any ``qwen2`` checkpoint's tokenizer as ``Qwen2Tokenizer`` from the
saved vocab; building the same pipeline here makes every transformers version agree.

Special tokens: ``<|endoftext|>`` (eos and pad), ``<|im_start|>``, ``<|im_end|>``; the chat
template is ChatML (what Qwen2 uses), so ``apply_chat_template(..., add_generation_prompt=True)``
renders ``<|im_start|>assistant\\n`` at the end. There is no bos token.

Usage::

    from nexrl.tiny import build_tiny_model
    path = build_tiny_model("/tmp/tiny")          # idempotent; returns the path
    python -m nexrl.tiny /tmp/tiny                # the same from a shell
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)

# ChatML, as rendered by Qwen2 tokenizers (minus their default system prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer split (words, single digits, punctuation runs, whitespace runs).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Written next to the weights; build_tiny_model reuses a directory whose marker matches.
_MARKER = "nexrl_tiny.json"


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes 0..255, in byte order.

    Printable Latin-1 bytes stand for themselves; the others (control chars, space, ...) are
    shifted to code points 256+ in byte order, as GPT-2/Qwen2 byte-level tokenizers do.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, shift = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + shift))
            shift += 1
    return out


def _build_tokenizer():
    """Byte-level BPE with no merges (one token per byte), Qwen2's exact pre/post-processing."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in _byte_alphabet():  # id = len(SPECIAL_TOKENS) + byte value
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, byte_fallback=False))
    # Same pipeline as transformers' Qwen2Tokenizer (which AutoTokenizer picks for any
    # qwen2 checkpoint and rebuilds from our vocab), so every transformers version agrees.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )


def build_tiny_model(
    path: str,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    vocab_size: int | None = None,
    init_std: float = 0.2,
) -> str:
    """Build (or reuse) a random-init Qwen2ForCausalLM + byte-level tokenizer under ``path``.

    Idempotent: if ``path`` already holds a model built with the same arguments it is reused
    as is. ``vocab_size`` sets the model's embedding rows (None: the tokenizer's 259); a
    larger value gives benchmark models a realistic vocab (e.g. Qwen2.5's 151936) while the
    tokenizer stays byte-level (ids past 258 decode to nothing). ``init_std`` is the weight
    init std: 0.2 rather than HF's 0.02, because a 0.02 tiny model emits one token forever,
    and tests of batching, positions and weight updates need context-dependent outputs.
    The directory is written to a temporary sibling and renamed into place, so a concurrent
    builder or a crash never leaves a half-written model behind. Returns ``path``.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    args = dict(
        num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
        num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, seed=seed,
        tie_word_embeddings=tie_word_embeddings, vocab_size=vocab_size, init_std=init_std,
        version=1,
    )
    path = os.path.abspath(path)
    marker = os.path.join(path, _MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == args:
                return path
        raise FileExistsError(
            f"nexrl.tiny: {path} holds a tiny model built with different arguments "
            f"({marker}); pick another path or delete it"
        )
    if os.path.exists(path) and os.listdir(path):
        raise FileExistsError(f"nexrl.tiny: {path} exists, is not empty and is not a tiny model")

    tokenizer = _build_tokenizer()
    config = Qwen2Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        initializer_range=init_std,
        torch_dtype="float32",
    )
    fork_devices: list = []  # seed only this builder's RNG, not the caller's global stream
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # like Qwen2.5-Instruct: generation ends at <|endoftext|> or at the end of a chat turn
    model.generation_config.eos_token_id = [tokenizer.eos_token_id,
                                            tokenizer.convert_tokens_to_ids(IM_END)]

    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, _MARKER), "w") as f:
            json.dump(args, f)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        try:
            os.rename(tmp, path)
        except OSError:
            # Lost a race with another builder: keep theirs if it is the same model.
            if os.path.exists(marker):
                with open(marker) as f:
                    if json.load(f) == args:
                        return path
            raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m nexrl.tiny PATH [--seed S] ...`: build (or reuse) a tiny model at PATH."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m nexrl.tiny", description=main.__doc__)
    ap.add_argument("path")
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--num-kv-heads", type=int, default=2)
    ap.add_argument("--intermediate-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-std", type=float, default=0.2)
    a = ap.parse_args(argv)
    path = build_tiny_model(a.path, num_layers=a.num_layers, hidden_size=a.hidden_size,
                            num_heads=a.num_heads, num_kv_heads=a.num_kv_heads,
                            intermediate_size=a.intermediate_size, seed=a.seed,
                            init_std=a.init_std)
    print(f"tiny model at {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
