"""Shape buckets: a new prompt length or max_length inside a known bucket reuses its compile."""


def length_bucket(length):
    """The padded width for sequences of `length`: a power of two from 16 up to 1024, then a
    multiple of 1024 (so padding wastes at most half below 1024 and under 1024 positions above).

    Example:
    >>> [length_bucket(n) for n in (1, 16, 17, 300, 1025)]
    [16, 16, 32, 512, 2048]
    """
    if length <= 16:
        return 16
    if length <= 1024:
        return 1 << (int(length) - 1).bit_length()
    return -(-int(length) // 1024) * 1024


def prefill_bucket(length, width):
    """How many positions the prefill runs for a prompt of `length` in a cache of `width`.

    Rounding up is safe: cache entries past the prompt are rewritten by the decode steps
    before any query reads them.
    """
    if length <= 0:
        return 0
    return min(width, length_bucket(length))
