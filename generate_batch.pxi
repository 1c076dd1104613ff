# Included by run.pyx and runq.pyx after their generate() (written once: it has no twin in the C,
# and is the same for both): generate() for several sequences at once.

def generate_batch(Transformer transformer, tokenizer, list samplers, list prompts,
                   list steps, stopped=()):
    """generate() for several prompts at once, each with its own sampler and step count, on run
    states of their own: every prompt is fed together (as generate() does), then each pass of
    forward_batch moves every live sequence on by one token, so that a weight row read from memory
    serves all of them. Yields (index, piece bytes) where generate() would yield the piece; each
    sequence runs generate()'s loop, so its pieces are generate()'s for the same prompt, sampler
    and steps, on every build (forward_batch gives a token the same bits however it is batched).
    A sequence whose index the caller puts in stopped is dropped at the next pass."""
    cdef int n = len(prompts), i, b, B, next
    steps = list(steps)  # this generation's own: a sequence's ends when it meets BOS (or EOS)
    # a KV cache each; forward_batch's buffers once, the first sequence's (new_state)
    cdef list states = [new_state(transformer, i == 0) for i in range(n)]
    cdef list prompt_tokens = [prompt_tokens_of(tokenizer, p) for p in prompts]
    cdef list pos = [0] * n, token = [t[0] for t in prompt_tokens], live = []
    cdef BatchEntry batch[MAX_LOGITS]
    cdef Transformer state
    cdef BatchState* bs
    cdef bytes piece
    cdef int vocab_size = transformer.c_config.vocab_size
    # the prompts: generate()'s loop up to the last prompt token, whose logits need no sampling
    for i in range(n):
        piece = first_piece(tokenizer, prompt_tokens[i])
        if piece:
            yield i, piece
        prefilled = prefill(states[i], prompt_tokens[i], min(len(prompt_tokens[i]) - 1, steps[i]),
                            states[0])
        while pos[i] < prefilled:
            next = prompt_tokens[i][pos[i] + 1]
            pos[i] += 1
            if ends_sequence(tokenizer, next, False):
                steps[i] = pos[i]  # ends this sequence, as generate()'s break does
                break
            piece = printed_piece(tokenizer, token[i], next)
            if piece:
                yield i, piece
            token[i] = next
        if pos[i] < steps[i]:
            live.append(i)
    if not live:
        return
    bs = &(<Transformer>states[0]).batch  # this generation's own activations
    while live:
        # one pass: each live sequence's token at its position, MAX_LOGITS sequences at a time
        # (each pass keeps every one's logits)
        for start in range(0, len(live), MAX_LOGITS):
            group = live[start:start + MAX_LOGITS]
            B = len(group)
            for b in range(B):
                state = states[group[b]]
                batch[b].s = &state.state
                batch[b].token = token[group[b]]
                batch[b].pos = pos[group[b]]
                batch[b].want_logits = True
            with nogil:
                forward_pass(transformer, bs, batch, B)
            # then generate()'s loop body for each, from its logits
            for b in range(B):
                i = group[b]
                if pos[i] < len(prompt_tokens[i]) - 1:
                    next = prompt_tokens[i][pos[i] + 1]
                else:
                    next = sample(samplers[i], bs.logits + <Py_ssize_t>b * vocab_size)
                pos[i] += 1
                if ends_sequence(tokenizer, next, pos[i] >= len(prompt_tokens[i])):
                    steps[i] = pos[i]  # ends this sequence, as generate()'s break does
                    continue
                piece = printed_piece(tokenizer, token[i], next)
                if piece:
                    yield i, piece
                token[i] = next
        live = [i for i in live if pos[i] < steps[i] and i not in stopped]
