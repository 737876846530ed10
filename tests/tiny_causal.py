"""Tiny random causal LMs on disk (Llama- and Gemma-shaped) with a character-level tokenizer."""

from __future__ import annotations

import string
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, processors

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per printable ASCII character; <bos> prepended; decoding concatenates."""
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(shape: str, vocab: int):
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if shape == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    # Gemma 3 as the 270M base: tied embeddings, sliding-window layers; soft-capping to test the head path
    return transformers.Gemma3TextConfig(
        **common, head_dim=8, sliding_window=16, final_logit_softcapping=30.0, tie_word_embeddings=True
    )


def make_causal(folder: Path, shape: str = "llama", seed: int = 0) -> Path:
    """A random tiny causal LM + tokenizer saved as a Hugging Face folder."""
    tok = char_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_config(shape, len(tok))
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger weights than the init: greedy output depends on the prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, target) pairs of varied lengths: the target is the reversed prompt."""
    g = torch.Generator().manual_seed(seed)
    letters = string.ascii_lowercase
    out = []
    for _ in range(n):
        k = int(torch.randint(3, 12, (1,), generator=g))
        word = "".join(letters[int(i)] for i in torch.randint(0, 26, (k,), generator=g))
        out.append((f"rev {word}:", word[::-1]))
    return out


def random_adapter(
    base: Path,
    out: Path,
    r: int,
    alpha: int,
    seed: int,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
) -> Path:
    """A PEFT LoRA adapter of `base` with random A and B (not PEFT's zero B) on `targets`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return out
