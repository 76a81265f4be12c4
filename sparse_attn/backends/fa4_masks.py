"""CuTe DSL ``mask_mod`` functions for the FA4 backend (imported only when FA4 runs: needs ``nvidia-cutlass-dsl``).

Module-level functions without closures: FA4 keys its compile cache (in memory and on disk) on a hash of the
``mask_mod``'s source and captured values, so these hash the same in every process.  Each gets
``aux_tensors`` built in ``fa4.py``; all rows are padded to ``Nb * 128`` with "invalid" past ``N``.
"""

import cutlass
import cutlass.cute as cute
from flash_attn.cute import utils


@cute.jit
def _nonzero(x):
    return utils.scalar_to_ssa(x, cutlass.Int32) != utils.scalar_to_ssa(0, cutlass.Int32)


@cute.jit
def key_valid(batch_idx, head_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
    """aux_tensors = [key validity int32 [B, Nb*128]]."""
    return _nonzero(aux_tensors[0][batch_idx[0], kv_idx[0]])


@cute.jit
def group_pair(batch_idx, head_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
    """aux_tensors = [query group int32 [B, H, Nb*128], key group (same), selected pairs int32 [B, H, R+1, C+1]]."""
    qg = aux_tensors[0][batch_idx[0], head_idx[0], q_idx[0]]
    kg = aux_tensors[1][batch_idx[0], head_idx[0], kv_idx[0]]
    return _nonzero(aux_tensors[2][batch_idx[0], head_idx[0], qg, kg])


@cute.jit
def group_pair_key_valid(batch_idx, head_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
    """group_pair and key_valid together: aux_tensors = [query group, key group, pairs, key validity]."""
    qg = aux_tensors[0][batch_idx[0], head_idx[0], q_idx[0]]
    kg = aux_tensors[1][batch_idx[0], head_idx[0], kv_idx[0]]
    ok = aux_tensors[2][batch_idx[0], head_idx[0], qg, kg] * aux_tensors[3][batch_idx[0], kv_idx[0]]
    return _nonzero(ok)
