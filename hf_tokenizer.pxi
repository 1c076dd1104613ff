# Included by run.pyx and runq.pyx after their Tokenizer (written once, as it has no twin in the C):
# the points where generate() and generate_batch meet a tokenizer that is either run.c's Tokenizer
# (tokenizer.bin) or a Hugging Face one (llama2_cython.hf_tokenizer.HFTokenizer: a tokenizer.json
# or Meta's tiktoken tokenizer.model). For run.c's Tokenizer each one is run.c's own code.
from llama2_cython.hf_tokenizer import HFTokenizer, open_tokenizer as _open_tokenizer


def load_tokenizer(tokenizer_path, int vocab_size):
    """The tokenizer tokenizer_path names: run.c's Tokenizer for llama2.c's tokenizer.bin, an
    HFTokenizer for a tokenizer.json, a tiktoken tokenizer.model or a folder holding either."""
    return _open_tokenizer(tokenizer_path, vocab_size, Tokenizer)

cdef list prompt_tokens_of(tokenizer, prompt):
    # run.c: encode() with BOS (=1) in front, of any bytes; Hugging Face: encode(text) with the
    # special tokens its post-processor adds (which may be none: an empty prompt is refused)
    if isinstance(tokenizer, Tokenizer):
        if prompt is None:
            prompt = b""
        elif isinstance(prompt, str):
            prompt = prompt.encode("utf-8", "surrogateescape")
        return encode(<Tokenizer>tokenizer, prompt, 1, 0)
    return tokenizer.prompt_tokens(prompt)

cdef bytes first_piece(tokenizer, list prompt_tokens):
    # the prompt's first token is fed, never printed: run.c's is always BOS; a Hugging Face prompt
    # without BOS (SmolLM) prints its first token here
    if isinstance(tokenizer, Tokenizer):
        return None
    return tokenizer.first_piece(prompt_tokens)

cdef bint ends_sequence(tokenizer, int token, bint sampled) except -1:
    # run.c: the BOS (=1) token delimits sequences; Hugging Face: a sampled EOS id (from the
    # model's generation_config.json / config.json, else tokenizer_config.json) ends the text, not
    # being printed; one the prompt holds is part of the prompt
    if isinstance(tokenizer, Tokenizer):
        return token == 1
    return sampled and token in tokenizer.eos_ids

cdef bytes printed_piece(tokenizer, int prev_token, int token):
    # run.c: the piece decode() gives, when safe_printf would print it (else None); Hugging Face:
    # the token's raw bytes, which may be part of a UTF-8 character (b"" for an id past the
    # tokenizer's vocabulary; a sentencepiece-style piece right after BOS without its space)
    cdef const char* piece
    if isinstance(tokenizer, Tokenizer):
        piece = decode(<Tokenizer>tokenizer, prev_token, token)
        return <bytes>piece if printable_piece(piece) else None
    return tokenizer.piece(token, prev_token)
