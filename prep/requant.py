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
    little-endian bit stream per row, which for 2/4/8 bits is LSB-first per word).
    Works on the bytes: for 4 and 8 bits that is one or two cheap uint8 passes."""
    lead = words.shape[:-1]
    raw = np.ascontiguousarray(words, dtype="<u4").view(np.uint8)
    if bits == 8:
        return raw.reshape(*lead, n_in)
    if bits == 4:
        out = np.empty((*lead, raw.shape[-1], 2), np.uint8)
        np.bitwise_and(raw, 0x0F, out=out[..., 0])
        np.right_shift(raw, 4, out=out[..., 1])
        return out.reshape(*lead, n_in)
    if bits == 2:
        out = np.empty((*lead, raw.shape[-1], 4), np.uint8)
        for k in range(4):
            np.bitwise_and(np.right_shift(raw, 2 * k), 3, out=out[..., k])
        return out.reshape(*lead, n_in)
    stream = np.unpackbits(raw, axis=-1, bitorder="little")
    stream = stream[..., :n_in * bits].reshape(*lead, n_in, bits)
    weights = (1 << np.arange(bits)).astype(np.uint16)
    return (stream.astype(np.uint16) * weights).sum(-1).astype(np.uint8)


def dequantize(words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
               group_size: int) -> np.ndarray:
    """Affine dequantization: ``w[r, c] = s[r, c/gs] * q[r, c] + b[r, c/gs]`` in f32
    (a product then a sum, each rounded, as mlx computes it). scales/biases are f32
    here. Returns [..., n_in] f32."""
    n_in = scales.shape[-1] * group_size
    x = unpack_codes(words, bits, n_in).astype(np.float32)
    xg = x.reshape(*x.shape[:-1], scales.shape[-1], group_size)
    xg *= scales[..., None]
    xg += biases[..., None]
    return x


def quantize_2bit(x: np.ndarray, group_size: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """f32 [..., n_in] -> (U32 words [..., n_in/16], BF16 scales and biases as raw
    uint16 [..., n_in/gs], the dequantized 2-bit values f32 [..., n_in])."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    if n_in % group_size or n_in % 16:
        raise FormatError(f"2-bit requantization: {n_in} inputs is not a multiple of "
                          f"group_size {group_size} and of 16")
    g = x.reshape(*lead, n_in // group_size, group_size)
    lo = g.min(-1)
    hi = g.max(-1)
    s_bf = f32_to_bf16((hi - lo) / np.float32(3.0))
    b_bf = f32_to_bf16(lo)
    s = bf16_to_f32(s_bf)[..., None]
    b = bf16_to_f32(b_bf)[..., None]
    div = np.where(s == 0, np.float32(1.0), s)
    q = g - b
    q /= div
    np.rint(q, out=q)
    np.clip(q, 0, 3, out=q)
    codes = q.astype(np.uint8).reshape(*lead, n_in // 4, 4)
    # 4 codes per byte, code k of a byte at bits 2k; 4 bytes per little-endian U32
    # word, so element 16w+n lands at bits 2n of word w (mlx's order)
    packed = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | \
        (codes[..., 3] << 6)
    words = np.ascontiguousarray(packed).view("<u4").astype(np.uint32, copy=False)
    q *= s
    q += b
    return words, s_bf, b_bf, q.reshape(x.shape)


def dequantize_2bit(words: np.ndarray, s_bf: np.ndarray, b_bf: np.ndarray,
                    group_size: int) -> np.ndarray:
    return dequantize(words, bf16_to_f32(s_bf), bf16_to_f32(b_bf), 2, group_size)
