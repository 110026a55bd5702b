"""nexrl.tiny: the locally built Qwen2 model + byte-level tokenizer every test relies on.

Run: python -m pytest tests/test_tiny.py -q
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nexrl.tiny import build_tiny_model


def test_build_load_round_trip_and_idempotence(tmp_path):
    path = build_tiny_model(str(tmp_path / "m"), num_layers=1, max_position_embeddings=128)
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert build_tiny_model(str(tmp_path / "m"), num_layers=1,
                            max_position_embeddings=128) == path  # reused, not rebuilt
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime
    with pytest.raises(FileExistsError, match="different arguments"):
        build_tiny_model(str(tmp_path / "m"), num_layers=2)

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 1
    assert len(tok) == model.config.vocab_size == 259
    for text in ["Hello, world!\n\tx  y", "é漢 <|im_end|> tail", "  leading and trailing  "]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.encode("abc") == [3 + ord("a"), 3 + ord("b"), 3 + ord("c")]  # id = 3 + byte
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert set(model.generation_config.eos_token_id) == {
        tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}

    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(chat, add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_seed_determines_weights(tmp_path):
    a = AutoModelForCausalLM.from_pretrained(build_tiny_model(str(tmp_path / "a"), num_layers=1))
    a2 = AutoModelForCausalLM.from_pretrained(build_tiny_model(str(tmp_path / "a2"),
                                                               num_layers=1))
    b = AutoModelForCausalLM.from_pretrained(build_tiny_model(str(tmp_path / "b"), num_layers=1,
                                                              seed=1))
    wa, wa2, wb = (dict(m.named_parameters())["model.embed_tokens.weight"] for m in (a, a2, b))
    assert torch.equal(wa, wa2) and not torch.equal(wa, wb)
    # init_std 0.2: greedy output depends on the context (a 0.02 init repeats one token)
    out = a.generate(torch.tensor([[100, 101, 102]]), max_new_tokens=20, do_sample=False,
                     eos_token_id=None)
    assert len(set(out[0, 3:].tolist())) > 3
