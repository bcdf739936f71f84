"""2-bit requantization of routed experts (reference-system §2.2 "2-bit
requantization"), in numpy.

Per group of ``group_size`` consecutive inputs of a row, the source codes are
dequantized to f32 (``x = s*q + b``), then re-encoded with 4 levels spanning the
group's range: ``s2 = (max - min) / 3``, ``b2 = min``. s2 and b2 are stored as BF16,
rounded to nearest even; the codes are chosen against the ROUNDED s2 and b2
(``q = clamp(rint((x - b2) / s2), 0, 3)``, divisor 1 when s2 is 0), so the stored
codes are the best ones for the scale the engine will actually use. Codes are packed
16 per U32 word, least-significant bits first (mlx's order).
"""
from __future__ import annotations

import numpy as np

from moeflux.errors import FormatError
from moeflux.prep.safetensors_io import bf16_to_f32, f32_to_bf16


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Float tensor data as f32 (BF16 given as raw uint16 words)."""
    if dtype == "BF16":
        return bf16_to_f32(raw)
    if dtype in ("F16", "F32"):
        return raw.astype(np.float32)
    raise FormatError(f"scales/biases dtype {dtype} cannot be dequantized")


def unpack_codes(words: np.ndarray, bits: int, n_in: int) -> np.ndarray:
    """U32 words [..., n_in*bits/32] -> codes uint8 [..., n_in] (mlx bit order: a
    little-endian bit stream per row, which for 2/4/8 bits is LSB-first per word)."""
    lead = words.shape[:-1]
    if 32 % bits == 0:
        per = 32 // bits
        shifts = np.arange(per, dtype=np.uint32) * bits
        codes = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
        return codes.reshape(*lead, n_in).astype(np.uint8)
    raw = np.ascontiguousarray(words.astype("<u4")).view(np.uint8)
    stream = np.unpackbits(raw, axis=-1, bitorder="little")
    stream = stream[..., :n_in * bits].reshape(*lead, n_in, bits)
    weights = (1 << np.arange(bits)).astype(np.uint16)
    return (stream.astype(np.uint16) * weights).sum(-1).astype(np.uint8)


def dequantize(words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
               group_size: int) -> np.ndarray:
    """Affine dequantization: ``w[r, c] = s[r, c/gs] * q[r, c] + b[r, c/gs]`` in f32.
    scales/biases are f32 here. Returns [..., n_in] f32."""
    n_in = scales.shape[-1] * group_size
    q = unpack_codes(words, bits, n_in).astype(np.float32)
    qg = q.reshape(*q.shape[:-1], scales.shape[-1], group_size)
    x = qg * scales[..., None] + biases[..., None]
    return x.reshape(q.shape)


def quantize_2bit(x: np.ndarray, group_size: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """f32 [..., n_in] -> (U32 words [..., n_in/16], BF16 scales, BF16 biases as raw
    uint16 [..., n_in/gs])."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    if n_in % group_size or n_in % 16:
        raise FormatError(f"2-bit requantization: {n_in} inputs is not a multiple of "
                          f"group_size {group_size} and of 16")
    g = x.reshape(*lead, n_in // group_size, group_size)
    lo = g.min(-1)
    hi = g.max(-1)
    s_bf = f32_to_bf16((hi - lo) / np.float32(3.0))
    b_bf = f32_to_bf16(lo)
    s = bf16_to_f32(s_bf)
    b = bf16_to_f32(b_bf)
    div = np.where(s == 0, np.float32(1.0), s)
    q = np.rint((g - b[..., None]) / div[..., None])
    q = np.clip(q, 0, 3).astype(np.uint32).reshape(*lead, n_in // 16, 16)
    words = (q << (np.arange(16, dtype=np.uint32) * 2)).sum(-1, dtype=np.uint32)
    return words, s_bf, b_bf


def dequantize_2bit(words: np.ndarray, s_bf: np.ndarray, b_bf: np.ndarray,
                    group_size: int) -> np.ndarray:
    return dequantize(words, bf16_to_f32(s_bf), bf16_to_f32(b_bf), 2, group_size)
