"""A tiny SentencePiece model trained with Gemma's settings, once per test session.

Settings as in Gemma's tokenizer.model: BPE, byte fallback, split digits, identity normalizer,
no dummy prefix, whitespace kept, `<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3. Then user-defined
pieces: `<mask>` 4, `[@BOS@]` 5 and `<unused0>`..`<unused99>` 6..105 as fillers, so that
`<start_of_turn>` is 106 and `<end_of_turn>` 107 as in Gemma 1 and 2, then whitespace runs
(108..116). Code that looks the chat pieces up by name thus meets the real ids.
"""

import io
import os

import sentencepiece as spm

from tokenizer_corpus import CORPUS

START_OF_TURN_ID = 106
END_OF_TURN_ID = 107
VOCAB_SIZE = 1000

# User-defined pieces are matched greedily before BPE, as in Gemma's vocabulary. SentencePiece
# stores a space as "▁" before matching, so space runs are written with "▁".
_FILLER = ["<mask>", "[@BOS@]"] + [f"<unused{i}>" for i in range(100)]
_WHITESPACE_RUNS = ["\n", "\n\n", "\n\n\n", "\t", "\t\t"] + ["▁" * n for n in (2, 3, 4, 8)]
_CHAT = ["<start_of_turn>", "<end_of_turn>"]
USER_DEFINED_SYMBOLS = _FILLER + _CHAT + _WHITESPACE_RUNS
# CodeGemma's fill-in-the-middle pieces sit at ids 67..70 (where <unused61..64> are here).
FIM_PIECES = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|file_separator|>"]
_FIM_FILLER = _FILLER[:63] + FIM_PIECES + _FILLER[67:]


def _training_sentences():
    """The corpus plus generated prose, so BPE learns some multi-character merges."""
    words = (
        "the of and to in is that for it as with was on be at by this had not are but from "
        "or have an they which one you were her all she there would their we him been has "
        "when who will more no if out so said what up its about into than them can only "
        "model token keras gemma layer tensor text train data value"
    ).split()
    sentences = list(CORPUS)
    # A fixed linear-congruential walk keeps the text identical across runs and machines.
    state = 12345
    for _ in range(400):
        length = 5 + state % 9
        picked = []
        for _ in range(length):
            state = (1103515245 * state + 12345) % (2**31)
            picked.append(words[state % len(words)])
        sentence = " ".join(picked)
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
    return sentences


def train_gemma_like_model(whitespace_pieces=True, fim_pieces=False):
    """Train the model and return its serialized bytes.

    `whitespace_pieces=False` leaves out the space/tab/newline runs (the chat pieces keep their
    ids), for comparisons with tokenizers that treat those pieces differently.
    `fim_pieces=True` puts CodeGemma's fill-in-the-middle pieces at ids 67..70.
    """
    filler = _FIM_FILLER if fim_pieces else _FILLER
    symbols = filler + _CHAT + (_WHITESPACE_RUNS if whitespace_pieces else [])
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_sentences()),
        model_writer=buffer,
        model_type="BPE",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.99,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=symbols,
        minloglevel=2,
        num_threads=1,
    )
    return buffer.getvalue()


def gemma_like_model_file(directory, whitespace_pieces=True, fim_pieces=False):
    """Write `tokenizer.model` into `directory` (once) and return its path."""
    path = os.path.join(directory, "tokenizer.model")
    if not os.path.exists(path):
        proto = train_gemma_like_model(whitespace_pieces, fim_pieces)
        processor = spm.SentencePieceProcessor(model_proto=proto)
        # Guard the ids the tests state, so a change of settings cannot move them silently.
        assert processor.piece_to_id("<start_of_turn>") == START_OF_TURN_ID
        assert processor.piece_to_id("<end_of_turn>") == END_OF_TURN_ID
        if fim_pieces:
            assert processor.piece_to_id("<|fim_prefix|>") == 67
        with open(path, "wb") as f:
            f.write(proto)
    return path
