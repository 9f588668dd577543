"""Parameter-reduction layers: structured stand-ins for `nn.Linear` and `nn.Conv2d`.

A dense ``in x out`` layer holds and multiplies ``in * out`` numbers. The course's point is
that much of that is redundant: a product of diagonals and fast transforms (Fastfood), or
a single circulant matrix, learns nearly as well with O(n) parameters and O(n log n) time.
`LocallyConnected2d` goes the other way: it unties a convolution's weights, to show what
weight sharing saves.

The random parts (signs, permutations) are drawn from torch's global generator, so a model
built after ``torch.manual_seed(seed)`` is the same every time, and they are buffers, so a
state dict carries them to whoever loads the model.

This module registers no model family; the families choose these layers by name through
`projection`.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_RADIX_BITS = 5
"""`fwht` applies Hadamard blocks of at most 2^5 = 32 points per pass: a constant, so the
transform stays O(d log d), and large enough that a pass is one efficient matmul."""


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Walsh-Hadamard transform of the last dimension: x @ H, H the ±1 Sylvester matrix.

    H_d is a Kronecker product of small Hadamards (H_d = H_r1 ⊗ H_r2 ⊗ ...), so each pass
    multiplies one r-point factor of the index by an r x r block on the last axis, then
    rotates that axis to the front for the next pass (the shuffle algorithm for Kronecker
    products). With r <= 32 that is about log_32(d) passes and O(r d log_r d) = O(d log d)
    work, with no d x d matrix; fewer, larger kernels than 2-point butterflies run 2-4x
    faster on CPU. d must be a power of two. Unnormalised (H H = d I), as in the
    Fastfood paper.
    """
    *lead, d = x.shape
    y = x.reshape(-1, d)
    n = len(y)
    for r in _radices(d):
        y = (y.reshape(n, d // r, r) @ _hadamard(r, x.dtype, x.device)).transpose(1, 2)
        y = y.reshape(n, d)
    return y.reshape(*lead, d)


def _radices(d: int) -> list[int]:
    """Split log2(d) bits evenly over the fewest passes: 8192 -> 32, 16, 16 (not 32, 32, 8)."""
    bits = d.bit_length() - 1
    if d != 1 << bits:
        raise ValueError(f"the Walsh-Hadamard transform needs a power of two, got {d}")
    passes = -(-bits // MAX_RADIX_BITS)
    return [1 << (bits // passes + (i < bits % passes)) for i in range(passes)]


@functools.lru_cache(maxsize=None)
def _hadamard(r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while len(h) < r:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def _uniform_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """nn.Linear's default scale, so a structured layer dropped in keeps activations' size."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(tensor, -bound, bound)


def _random_signs(*shape: int) -> torch.Tensor:
    return torch.randint(0, 2, shape).float() * 2 - 1


class FastfoodLinear(nn.Module):
    """Fastfood (Le, Sarlós & Smola 2013): W = S H G Π H B in place of a dense matrix.

    B (random ±1 at first), G (Gaussian) and S (scaling) are learnable diagonals, H is the
    Walsh-Hadamard matrix (`fwht`) and Π a fixed random permutation (a buffer). H needs a
    power of two, so the input is zero-padded to ``d``, the next power of two >=
    in_features; the padded columns of W only ever meet zeros. When out_features > d,
    ceil(out / d) independent blocks are stacked and the output cut to out_features.
    Cost per example: O(n log d) time (n = blocks * d) and 3 n + out parameters,
    against in * out for a dense layer.

    Each entry of W is S_i B_j times a sum of d terms ±g_k. G and S start at the same
    scale, (3 in d)^(-1/4), so that entries have variance 1 / (3 in) as under
    `nn.Linear`'s default init: the layer replaces one without changing the size of the
    activations, and G and S move at the same relative rate under Adam. The diagonals
    multiply, so plain SGD sees badly scaled gradients: train with Adam, or with SGD at a
    small learning rate.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"fastfood needs positive sizes, got {in_features} x {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.d = 1 << (in_features - 1).bit_length()
        self.blocks = -(-out_features // self.d)
        shape = (self.blocks, self.d)
        self.B = nn.Parameter(_random_signs(*shape))
        self.G = nn.Parameter(torch.randn(shape) * (3 * in_features * self.d) ** -0.25)
        # S is set from each block's actual ||g||, so W's scale does not depend on G's draw.
        scale = 1.0 / (self.G.detach().norm(dim=1, keepdim=True) * math.sqrt(3 * in_features))
        self.S = nn.Parameter(scale.expand(shape).clone())
        # One permutation per block, offset into the flattened (blocks * d) axis so that a
        # single index_select applies them all.
        perms = torch.stack([torch.randperm(self.d) for _ in range(self.blocks)])
        self.register_buffer("perm", perms + self.d * torch.arange(self.blocks)[:, None])
        self.bias = nn.Parameter(_uniform_(torch.empty(out_features), in_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, n = x.shape
        x = F.pad(x.reshape(-1, n), (0, self.d - n))
        z = fwht(x[:, None, :] * self.B)                                  # (N, blocks, d)
        z = z.reshape(len(x), -1).index_select(1, self.perm.reshape(-1))  # Π per block
        z = fwht(z.reshape(len(x), self.blocks, self.d) * self.G) * self.S
        y = z.reshape(len(x), -1)[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"d={self.d}, blocks={self.blocks}, bias={self.bias is not None}")


class CirculantLinear(nn.Module):
    """Circulant projection (Cheng et al. 2015): y = circ(r) D x, by FFT.

    circ(r) (entry i, j = r[(i - j) mod d]) is diagonalised by the Fourier transform, so
    the product costs O(d log d) with d = max(in, out), and the layer holds d + out
    parameters. D is a fixed random ±1 diagonal (a buffer), as in the paper: a circulant
    maps a constant input to the same value at every output, so without D the common mean
    of non-negative inputs (ReLU outputs) would reach all units alike. When in != out
    the input is zero-padded to d and the output cut to out_features.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"circulant needs positive sizes, got {in_features} x {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.d = max(in_features, out_features)
        # r is named `weight` so that per-layer diagnostics (gradient norms) see it.
        self.weight = nn.Parameter(_uniform_(torch.empty(self.d), in_features))
        self.register_buffer("D", _random_signs(in_features))
        self.bias = nn.Parameter(_uniform_(torch.empty(out_features), in_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft(self.weight) * torch.fft.rfft(x * self.D, n=self.d)
        y = torch.fft.irfft(spectrum, n=self.d)[..., : self.out_features]
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class LocallyConnected2d(nn.Module):
    """A convolution whose kernel (and bias) differ at every output position.

    Same receptive fields as `nn.Conv2d`, none of its weight sharing: the parameter count
    grows with the map's area, which is the cost that sharing avoids. The input size must
    be known up front because each position owns its weights.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 input_size: tuple[int, int], stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        h, w = input_size
        self.out_size = ((h + 2 * padding - kernel_size) // stride + 1,
                         (w + 2 * padding - kernel_size) // stride + 1)
        if min(self.out_size) < 1 or min(in_channels, out_channels, kernel_size, stride) < 1:
            raise ValueError(
                f"locally connected layer: kernel {kernel_size}, stride {stride}, padding "
                f"{padding} leave no output on a {h}x{w} map of {in_channels} channels")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        positions, fan_in = self.out_size[0] * self.out_size[1], in_channels * kernel_size ** 2
        self.weight = nn.Parameter(_uniform_(torch.empty(positions, out_channels, fan_in), fan_in))
        self.bias = (nn.Parameter(_uniform_(torch.empty(out_channels, *self.out_size), fan_in))
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)
        y = torch.einsum("ncl,loc->nol", patches, self.weight)
        y = y.reshape(len(x), self.out_channels, *self.out_size)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, out_size={self.out_size}")


PROJECTIONS = {"dense": nn.Linear, "fastfood": FastfoodLinear, "circulant": CirculantLinear}


def check_projection(kind: str) -> None:
    """Reject an unknown kind when the config is read, even if no layer would use it."""
    if kind not in PROJECTIONS:
        raise ValueError(f"unknown projection {kind!r} (known: {', '.join(PROJECTIONS)})")


def projection(kind: str, in_features: int, out_features: int) -> nn.Module:
    """A linear map ``in -> out`` of the given kind: dense, fastfood or circulant."""
    check_projection(kind)
    return PROJECTIONS[kind](in_features, out_features)
