"""Launch sizes for row-wise kernels (one reduction per row of a (rows, C) matrix): LayerNorm and kin.

A row-wise kernel keeps a whole row in registers, so its tile is (BLOCK_M rows, BLOCK_N >= C columns),
and the shapes it meets vary in one number only, the row length C. That makes autotuning pointless
(STYLE.md rule 4): the tile and the warp count follow from C here, in one place.

    cfg = row_config(n_cols)          # cfg.block_n, cfg.block_m, cfg.num_warps, cfg.programs_per_sm
    grid = persistent_programs(device, cfg.programs_per_sm)

Design limit: a row of at most MAX_COLS elements. Fast up to 8192 columns (one row, 16 warps, no spills);
at 16384 the LayerNorm backward spills registers; longer rows would need a loop over column blocks.
"""
import functools
from dataclasses import dataclass

import torch
from kernels.launch import next_power_of_2

MAX_COLS = 16384
TILE_ELEMENTS = 2048   # elements a program keeps per live tensor: short rows are packed BLOCK_M at a time
MAX_WARPS = 16
REGISTERS_PER_SM = 65536   # sm_80 and sm_90
# Registers a thread of the LayerNorm backward takes at most, compiled for sm_90 at the four GPT-2 widths
# with the model's dtypes and torch.compile's scalar types, by Triton 3.6 and 3.9 (96 to 128; 16 elements
# a thread per live tensor). Wider rows keep 16 a thread on more warps and are assumed to take as many.
BACKWARD_REGISTERS = 128


@dataclass(frozen=True)
class RowConfig:
    block_n: int      # columns of the tile: next power of two >= C
    block_m: int      # rows of the tile: several short rows per program, so each program moves enough bytes
    num_warps: int
    programs_per_sm: int   # of the persistent backward: as many as a multiprocessor holds at once, at most 4


def row_config(n_cols: int) -> RowConfig:
    # int(): under torch.compile with dynamic shapes, specialize on C, a model constant
    return _row_config(int(n_cols))


@functools.lru_cache(maxsize=None)
def _row_config(n_cols: int) -> RowConfig:  # cached: it is on the host path of every call
    if n_cols > MAX_COLS:
        raise ValueError(f"row-wise kernels take rows of at most {MAX_COLS} elements, got {n_cols}")
    block_n = next_power_of_2(max(n_cols, 1))
    block_m = max(1, TILE_ELEMENTS // block_n)
    # 16 elements a thread per live tensor, in 2048-element tiles (2 rows of C = 768 on 4 warps). Compiled
    # for sm_90 with the model's dtypes (benchmarks/compiled_kernels.py; C = 768, fp32 x, bf16 y): the
    # LayerNorm forward takes 55 registers a thread, so 9 programs share a multiprocessor with 73 KB of
    # loads in flight, and the backward 96 to 128 at every GPT-2 width, so 4 fit: the persistent grid's
    # 4 per multiprocessor run in one wave. The 4096-element tile on 8 warps had 80 KB in flight forward but spilled 16 bytes a
    # thread, and its backward (113 registers, 2 programs a multiprocessor) ran in two waves. Not yet
    # timed on a GPU.
    num_warps = min(MAX_WARPS, max(4, block_m * block_n // 512))
    return RowConfig(block_n=block_n, block_m=block_m, num_warps=num_warps,
                     programs_per_sm=backward_programs_per_sm(num_warps))


def backward_programs_per_sm(num_warps: int) -> int:
    """Programs of the persistent backward per multiprocessor: at most 4, and no more than fit at once, or
    the last would run after the others and double the time (4 programs of 4 warps at 128 registers
    fill a multiprocessor's registers exactly; on 8 warps 2 fit, on 16 one)."""
    return max(1, min(4, REGISTERS_PER_SM // (BACKWARD_REGISTERS * 32 * num_warps)))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(device: torch.device, per_sm: int = 4) -> int:
    """Programs for a kernel that loops over row tiles: a fixed grid keeps a reduction's order fixed.

    On the GPU: `per_sm` programs per multiprocessor, enough to hide memory latency while the
    per-program partial sums stay a small fraction of the traffic. Elsewhere (the interpreter) a few.
    The count does not depend on the number of rows (programs without a tile write zero partials),
    so a compiled graph does not specialize on the batch size.
    """
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return per_sm * _multiprocessors(index)
