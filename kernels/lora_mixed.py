"""Mixed-adapter batches on the LoRA kernels: the rows of each adapter (and the base's) in tiles of MIXED_TILE rows,
-1 padding each adapter's last tile; every kernel takes a tile's rows from the table, so nothing is gathered or sorted
in memory. The tables, and the forward and backward launchers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .common import INTERPRET_GEMM, compute_dtype, dot_precision, launch, new_output
from .lora_linear import MixedLaunch, lora_gemm
from .lora_lowrank import _lora_bwd_da_kernel, _lora_bwd_dy_kernel, _lora_shrink_kernel
from .lora_tuning import DY_CONFIGS, DY_DEFAULT, INTERPRET_DY, MIXED_TILE, _dy_tuned, _num_sms, _rank_block

INTERPRET_MIXED_TILE = INTERPRET_GEMM["BLOCK_M"]  # (= INTERPRET_DY_BLOCK_M)
INTERPRET_MIXED_DA_BLOCK_K = 32
MIXED_DA_BLOCK_K = 64


@dataclass
class MixedTiles:
    rows: torch.Tensor  # (tiles · tile,) int32 row ids, -1 for padding
    tile_adapter: torch.Tensor  # (tiles,) int32, -1: the base alone
    tiles: int
    tile: int
    adapters: list[int]  # tile_adapter on the host, for the per-tile values


def mixed_tiles(index: torch.Tensor, n: int, device) -> MixedTiles:
    """Tiles for a mixed batch's per-row adapter index (-1 = base): each adapter's rows in order, padded to whole
    tiles (read on the host once)."""
    tile = INTERPRET_MIXED_TILE if torch.device(device).type == "cpu" else MIXED_TILE
    host = index.cpu().to(torch.int64)
    rows, adapters = [], []
    for a in range(-1, n):
        ids = (host == a).nonzero().flatten().to(torch.int32)
        if ids.numel() == 0:
            continue
        count = -(-ids.numel() // tile)
        rows.append(torch.cat([ids, torch.full((count * tile - ids.numel(),), -1, dtype=torch.int32)]))
        adapters += [a] * count
    rows_t = torch.cat(rows) if rows else torch.empty(0, dtype=torch.int32)
    return MixedTiles(rows_t.to(device), torch.tensor(adapters, dtype=torch.int32, device=device), len(adapters), tile,
                      adapters)


def _per_tile(tiles: MixedTiles, values, device) -> torch.Tensor:
    """A per-adapter value for each tile (0 for base tiles), fp32."""
    return torch.tensor([values[a] if a >= 0 else 0.0 for a in tiles.adapters], dtype=torch.float32, device=device)


def lora_mixed_fwd(x, weight, bias, A_stack, B_stack, scalings, dropout_ps, seed: int, tiles: MixedTiles):
    """Forward of a mixed batch: y (M, N) and S (M, R) fp32, with A_stack (n, R, K) and B_stack (n, N, R) the
    adapters stacked (ranks zero-padded to R), ``scalings`` and ``dropout_ps`` per adapter."""
    M, K = x.shape
    N = weight.shape[0]
    n, R, _ = A_stack.shape
    device, on_cpu = x.device, x.device.type == "cpu"
    s = new_output((M, R), torch.float32, device)
    y = new_output((M, N), x.dtype, device)
    if M == 0:
        return y, s
    tile_p = _per_tile(tiles, dropout_ps, device)
    dropout = max(dropout_ps) > 0.0
    block_k = 32 if on_cpu else 64
    _lora_shrink_kernel[(tiles.tiles,)](
        x, A_stack, s, tiles.rows, tiles.tile_adapter, tile_p, M, K, R, triton.next_power_of_2(M),
        x.stride(0), x.stride(1), A_stack.stride(1), A_stack.stride(2), A_stack.stride(0),
        seed, 0.0, 1.0,
        DROPOUT=dropout, COMPUTE=compute_dtype(x.dtype, on_cpu), DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=tiles.tile, BLOCK_K=block_k, BLOCK_R=_rank_block(R), MIXED=True,
        **({} if on_cpu else dict(num_warps=4, num_stages=3)))
    gemm_tiles = MixedLaunch(tiles.rows, tiles.tile_adapter, _per_tile(tiles, scalings, device), tile_p, tiles.tiles,
                             tiles.tile, B_stack.stride(0))
    lora_gemm(x, weight.t(), s, B_stack[0].t(), bias, y, 1.0, mixed=gemm_tiles)  # (dropout was S's, in the shrink)
    return y, s


def lora_mixed_bwd(dy, x, weight, A_stack, B_stack, s, scalings, dropout_ps, seed: int, tiles: MixedTiles,
                   needs_dx: bool, needs_dab: bool, needs_dbias: bool):
    """Backward of a mixed batch: (dx, dA_stack (n, R, K), dB_stack (n, N, R), dbias), each None where not needed;
    every adapter's gradients summed over its own tiles only."""
    M, N = dy.shape
    n, R, K = A_stack.shape
    device, on_cpu = dy.device, dy.device.type == "cpu"
    precision, compute = dot_precision(dy.dtype), compute_dtype(dy.dtype, on_cpu)
    block_r = _rank_block(R)
    dx = da = db = dbias = None
    if M == 0:
        return (torch.zeros((0, K), dtype=dy.dtype, device=device) if needs_dx else None,
                torch.zeros_like(A_stack, dtype=torch.float32) if needs_dab else None,
                torch.zeros_like(B_stack, dtype=torch.float32) if needs_dab else None,
                torch.zeros(N, dtype=dy.dtype, device=device) if needs_dbias else None)
    dropout = max(dropout_ps) > 0.0
    tile_p = _per_tile(tiles, dropout_ps, device)
    quantum = INTERPRET_DY["BLOCK_N"] if on_cpu else max(c.kwargs["BLOCK_N"] for c in DY_CONFIGS)
    col_splits = max(1, min(triton.cdiv(N, quantum), (2 * _num_sms(device)) // max(1, tiles.tiles)))
    cols_per_split = triton.cdiv(triton.cdiv(N, col_splits), quantum) * quantum
    col_splits = triton.cdiv(N, cols_per_split)
    ds_part = new_output((col_splits, M, R), torch.float32, device)
    db_part = new_output((tiles.tiles, N, R), torch.float32, device)
    dbias_part = new_output((tiles.tiles, N), torch.float32, device) if needs_dbias else None
    tile_lowrank_scale = _per_tile(tiles, scalings, device)
    launch(_dy_tuned, _lora_bwd_dy_kernel, DY_DEFAULT, INTERPRET_DY, lambda c: (tiles.tiles, col_splits), on_cpu,
           dy, B_stack, s, ds_part, db_part, dbias_part, None, None, None, None,
           tiles.rows, tiles.tile_adapter, tile_lowrank_scale,
           M, N, R, triton.next_power_of_2(M), cols_per_split,
           dy.stride(0), dy.stride(1), B_stack.stride(1), B_stack.stride(2), B_stack.stride(0), 1.0,
           HAS_DBIAS=needs_dbias, COMPUTE=compute, DOT_PRECISION=precision, BLOCK_M=tiles.tile, BLOCK_R=block_r,
           COL_SCALE=False, HAS_DM=False, WRITE_DZ=False, MIXED=True)
    ds = ds_part.sum(0) if col_splits > 1 else ds_part[0]
    adapter_of_tile = tiles.tile_adapter.to(torch.long)
    keep = adapter_of_tile >= 0  # the base's tiles add nothing to any adapter
    if needs_dbias:
        dbias = dbias_part.sum(0).to(dy.dtype)
    if needs_dab:
        db = torch.zeros((n, N, R), dtype=torch.float32, device=device).index_add_(
            0, adapter_of_tile[keep], db_part[keep])
        block_k = INTERPRET_MIXED_DA_BLOCK_K if on_cpu else MIXED_DA_BLOCK_K
        da_part = new_output((tiles.tiles, R, K), torch.float32, device)
        _lora_bwd_da_kernel[(triton.cdiv(K, block_k), tiles.tiles)](
            x, ds, da_part, tiles.rows, tiles.tile_adapter, tile_p, M, K, R, triton.next_power_of_2(M), tiles.tile,
            x.stride(0), x.stride(1), seed, 0.0, 1.0,
            DROPOUT=dropout, COMPUTE=compute, DOT_PRECISION=precision, BLOCK_M=tiles.tile, BLOCK_K=block_k,
            BLOCK_R=block_r, MIXED=True, **({} if on_cpu else dict(num_warps=4, num_stages=3)))
        da = torch.zeros((n, R, K), dtype=torch.float32, device=device).index_add_(
            0, adapter_of_tile[keep], da_part[keep])
    if needs_dx:
        dx = new_output((M, K), dy.dtype, device)
        keep_scale = _per_tile(tiles, [1.0 / (1.0 - p) for p in dropout_ps], device)
        launch_dx = MixedLaunch(tiles.rows, tiles.tile_adapter, keep_scale, tile_p, tiles.tiles, tiles.tile,
                                A_stack.stride(0))
        lora_gemm(dy, weight, ds, A_stack[0], None, dx, 1.0, seed, max(dropout_ps), mixed=launch_dx)
    return dx, da, db, dbias
