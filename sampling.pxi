# Included by run.pyx and runq.pyx after their sample_topp (written once: it has no twin in the C):
# two of the sampler's steps, rewritten to return run.c's token sooner. sample() calls them.
#
# sample_argmax_fast (argmax.h): greedy sampling's index (temperature 0: the command line's -t 0,
# and make bench's decodes). run.c's loop compares one logit at a time: 26 us for 32000 of them
# here, 1-2% of a 15M decode step and 4% of a pass of 16 sequences (generate_batch). This compares
# 16 at a time against the largest so far and runs run.c's loop only over the 16 that hold a
# larger one (a few, after the first): 2 us. It returns run.c's index: over 16 values the loop
# changes nothing unless one of them is larger than the largest before them, the very test made
# first. C's > is false beside a NaN in both (an all-NaN row gives 0, as in C); the fast build
# assumes there is no NaN, and there a NaN may send its 16 through run.c's loop, which decides.
#
# sample_topp_fast: top-p sampling that returns sample_topp's token without its qsort. Why:
# sample_topp sorts every candidate (probability >= (1 - topp) / (n - 1)) with qsort and a
# comparison function. With a flat distribution (an untrained model; often a trained one's long
# tail) nearly all of a 128k vocabulary are candidates, and the sort took 13 ms a token: a third
# of a Llama 3.2 1B int8 decode step here. This sorts the candidates' float bits instead (a
# positive float's bits order as it does) with three passes of a radix sort, then runs
# sample_topp's two scans on the sorted values, in the same order, with the same float additions:
# the same cut-off, the same cumulative sums, the same position drawn. Only which token sits at
# that position can depend on the sort, and only when its probability is tied with another
# candidate's: qsort is not stable, so run.c's token is then whichever its qsort put there, and
# this calls sample_topp itself. So does anything that is not a plain positive finite probability
# (NaN, infinity, a negative value that -Ofast let through), and an empty nucleus (sample_topp's
# edge case). tests/test_sampling.py holds the two to the same token on many distributions.

cdef extern from "argmax.h":
    int sample_argmax_fast(const float* probabilities, int n) noexcept nogil

DEF TOPP_DIGIT_BITS = 11  # the radix sort's digit: 3 passes over 32 bits, 2048 counters each
DEF TOPP_DIGITS = 2048
DEF TOPP_PASSES = 3
DEF TOPP_NOT_FINITE = 0x7F800000  # the bits of +inf; NaN and negative floats are above it

cdef inline float float_of(uint32_t bits) noexcept nogil:
    cdef float value
    memcpy(&value, &bits, sizeof(float))
    return value

cdef inline uint32_t bits_of(float value) noexcept nogil:
    cdef uint32_t bits
    memcpy(&bits, &value, sizeof(float))
    return bits

cdef uint32_t* radix_sort_keys(uint32_t* keys, uint32_t* spare, int n) noexcept nogil:
    # keys[0..n) in ascending order, least significant digit first (each pass a stable counting
    # sort); returns the buffer that holds them, keys or spare. A pass whose digit is the same for
    # every key (the exponent's, often) is skipped.
    cdef int counts[TOPP_PASSES * TOPP_DIGITS]
    cdef int* count
    cdef int i, p, digit, total, c, shift
    cdef uint32_t key
    cdef uint32_t* src = keys
    cdef uint32_t* dst = spare
    cdef uint32_t* swap
    memset(counts, 0, sizeof(counts))
    for i in range(n):
        key = keys[i]
        counts[key & (TOPP_DIGITS - 1)] += 1
        counts[TOPP_DIGITS + ((key >> TOPP_DIGIT_BITS) & (TOPP_DIGITS - 1))] += 1
        counts[2 * TOPP_DIGITS + (key >> (2 * TOPP_DIGIT_BITS))] += 1
    for p in range(TOPP_PASSES):
        count = counts + p * TOPP_DIGITS
        shift = p * TOPP_DIGIT_BITS
        if count[(keys[0] >> shift) & (TOPP_DIGITS - 1)] == n:
            continue
        total = 0
        for digit in range(TOPP_DIGITS):  # each digit's first place in the output
            c = count[digit]
            count[digit] = total
            total += c
        for i in range(n):
            key = src[i]
            digit = (key >> shift) & (TOPP_DIGITS - 1)
            dst[count[digit]] = key
            count[digit] += 1
        swap = src
        src = dst
        dst = swap
    return src

cdef int sample_topp_fast(const float* probabilities, int n, float topp, ProbIndex* probindex,
                          float coin) noexcept nogil:
    # sample_topp(probabilities, n, topp, probindex, coin), the same token (see the top)
    cdef int n0 = 0, i, j, last_idx, k
    cdef uint32_t key, largest = 0
    # the candidates' bits, in probindex's room (n ProbIndex hold 2n keys), the other half spare
    cdef uint32_t* keys = <uint32_t*>probindex
    cdef uint32_t* ordered
    # sample_topp's cut-off and candidates, computed alike
    cdef float cutoff = (<float>1.0 - topp) / (n - 1)
    for i in range(n):
        if probabilities[i] >= cutoff:
            key = bits_of(probabilities[i])
            keys[n0] = key
            largest = max(largest, key)
            n0 += 1
    if n0 == 0 or largest >= TOPP_NOT_FINITE:
        return sample_topp(probabilities, n, topp, probindex, coin)
    ordered = radix_sort_keys(keys, keys + n, n0)  # ascending: the j-th largest at n0 - 1 - j

    # sample_topp's scans, over the probabilities in descending order
    cdef float cumulative_prob = 0.0
    last_idx = n0 - 1
    for j in range(n0):
        cumulative_prob += float_of(ordered[n0 - 1 - j])
        if cumulative_prob > topp:
            last_idx = j
            break
    cdef float r = coin * cumulative_prob
    cdef float cdf = 0.0
    cdef int drawn = last_idx
    for j in range(last_idx + 1):
        cdf += float_of(ordered[n0 - 1 - j])
        if r < cdf:
            drawn = j
            break

    # the token at that position: the one candidate with its probability, unless it is tied
    k = n0 - 1 - drawn
    key = ordered[k]
    if (k > 0 and ordered[k - 1] == key) or (k + 1 < n0 and ordered[k + 1] == key):
        return sample_topp(probabilities, n, topp, probindex, coin)
    for i in range(n):
        if bits_of(probabilities[i]) == key:
            return i
    return sample_topp(probabilities, n, topp, probindex, coin)  # (not reached)


def sample_topp_of(float[::1] probabilities, float topp, float coin, *, bint reference=False):
    """The token that top-p sampling draws from probabilities (float32) with topp and coin (in
    [0, 1)): sample_topp_fast's, which sample() uses, or with reference=True run.c's sample_topp
    itself; the tests hold the two to the same token."""
    cdef int n = probabilities.shape[0]
    if n == 0:
        raise ValueError("no probabilities")
    cdef ProbIndex* probindex = <ProbIndex*>malloc(n * sizeof(ProbIndex))
    if not probindex:
        raise MemoryError()
    cdef int token
    with nogil:
        if reference:
            token = sample_topp(&probabilities[0], n, topp, probindex, coin)
        else:
            token = sample_topp_fast(&probabilities[0], n, topp, probindex, coin)
    free(probindex)
    return token


def sample_argmax_of(float[::1] probabilities, *, bint reference=False):
    """The token that greedy sampling takes from probabilities (float32): sample_argmax_fast's,
    which sample() uses, or with reference=True run.c's sample_argmax itself; the tests hold the
    two to the same token."""
    cdef int n = probabilities.shape[0]
    if n == 0:
        raise ValueError("no probabilities")
    if reference:
        return sample_argmax(&probabilities[0], n)
    return sample_argmax_fast(&probabilities[0], n)
