"""CPU check of the warp-level fragment addressing in csrc/cuda/attention.cu (runs without a GPU).

Simulates ldmatrix (.x4, with and without .trans) and mma.sync.m16n8k16 per the PTX ISA fragment
layouts, drives them with the same lane -> shared-memory address formulas as mma_abt (S = Q K^T),
mma_pb (O = P V, P kept in C fragments), mma_atb (dV += P^T dO and dK += dS^T Q with P and dS read
query-major from shared memory through ldmatrix .trans) and the dQ item loop of the dk/dv kernel, and
compares with numpy. Run: python csrc/dev/mma_fragments_sim.py   (prints max errors ~1e-15; exit 1 on a
mismatch)
If you change an address formula in attention.cu, mirror it here.
"""
import numpy as np
rng = np.random.default_rng(0)

def ldmatrix(smem, addrs, trans):
    # addrs[lane] = (row, col) start of an 8-element row; matrix i from lanes 8i..8i+7
    regs = [[None]*4 for _ in range(32)]
    for i in range(4):
        rows = [smem[addrs[8*i+j][0], addrs[8*i+j][1]:addrs[8*i+j][1]+8] for j in range(8)]
        M = np.stack(rows)  # 8x8, M[j] = row j
        for L in range(32):
            g, t = L // 4, L % 4
            if not trans:
                regs[L][i] = (M[g, 2*t], M[g, 2*t+1])
            else:
                regs[L][i] = (M[2*t, g], M[2*t+1, g])
    return regs

def mma(c, a, b0, b1):
    # c[L] = 4 floats; a[L] = 4 pairs; b0[L], b1[L] pairs. Rebuild A (16x16), B (16x8) per PTX layout.
    A = np.zeros((16, 16)); B = np.zeros((16, 8)); C = np.zeros((16, 8))
    for L in range(32):
        g, t = L // 4, L % 4
        for r, (row, col) in enumerate([(g, 2*t), (g+8, 2*t), (g, 2*t+8), (g+8, 2*t+8)]):
            A[row, col], A[row, col+1] = a[L][r]
        B[2*t, g], B[2*t+1, g] = b0[L]
        B[2*t+8, g], B[2*t+9, g] = b1[L]
        C[g, 2*t], C[g, 2*t+1], C[g+8, 2*t], C[g+8, 2*t+1] = c[L]
    C = C + A @ B
    for L in range(32):
        g, t = L // 4, L % 4
        c[L] = [C[g, 2*t], C[g, 2*t+1], C[g+8, 2*t], C[g+8, 2*t+1]]

def gather(acc, ntiles):  # acc[L][nt] -> 16 x (8*ntiles)
    R = np.zeros((16, 8*ntiles))
    for L in range(32):
        g, t = L // 4, L % 4
        for nt in range(ntiles):
            c = acc[L][nt]
            R[g, nt*8+2*t], R[g, nt*8+2*t+1], R[g+8, nt*8+2*t], R[g+8, nt*8+2*t+1] = c
    return R

def mma_abt(sA, row0, sB, DP, BN):
    acc = [[[0.0]*4 for _ in range(BN//8)] for _ in range(32)]
    for kk in range(DP//16):
        a = ldmatrix(sA, [(row0 + (l & 7) + ((l >> 3) & 1)*8, kk*16 + (l >> 4)*8) for l in range(32)], False)
        for nn in range(BN//16):
            b = ldmatrix(sB, [(nn*16 + (l & 7) + (l >> 4)*8, kk*16 + ((l >> 3) & 1)*8) for l in range(32)], False)
            for (tile, r0, r1) in [(2*nn, 0, 1), (2*nn+1, 2, 3)]:
                c = [acc[L][tile] for L in range(32)]
                mma(c, [a[L] for L in range(32)], [b[L][r0] for L in range(32)], [b[L][r1] for L in range(32)])
                for L in range(32): acc[L][tile] = c[L]
    return acc

def mma_pb(p, sB, DP, KN):
    # p[L][nt] C fragments of P (16 x KN); packs pairs exactly like the kernel
    acc = [[[0.0]*4 for _ in range(DP//8)] for _ in range(32)]
    for kk in range(KN//16):
        a = [[(p[L][2*kk][0], p[L][2*kk][1]), (p[L][2*kk][2], p[L][2*kk][3]),
              (p[L][2*kk+1][0], p[L][2*kk+1][1]), (p[L][2*kk+1][2], p[L][2*kk+1][3])] for L in range(32)]
        for dd in range(DP//16):
            b = ldmatrix(sB, [(kk*16 + (l & 15), dd*16 + (l >> 4)*8) for l in range(32)], True)
            for (tile, r0, r1) in [(2*dd, 0, 1), (2*dd+1, 2, 3)]:
                c = [acc[L][tile] for L in range(32)]
                mma(c, a, [b[L][r0] for L in range(32)], [b[L][r1] for L in range(32)])
                for L in range(32): acc[L][tile] = c[L]
    return acc

def mma_atb(sAt, key0, sB, col0, KM, NC):
    # acc (16 keys x NC) += A^T B, A^T read from the query-major sAt (KM x keys): the kernel's address formulas
    acc = [[[0.0]*4 for _ in range(NC//8)] for _ in range(32)]
    for kk in range(KM//16):
        a = ldmatrix(sAt, [(kk*16 + ((l >> 4) & 1)*8 + (l & 7), key0 + ((l >> 3) & 1)*8) for l in range(32)], True)
        for dd in range(NC//16):
            b = ldmatrix(sB, [(kk*16 + (l & 15), col0 + dd*16 + (l >> 4)*8) for l in range(32)], True)
            for (tile, r0, r1) in [(2*dd, 0, 1), (2*dd+1, 2, 3)]:
                c = [acc[L][tile] for L in range(32)]
                mma(c, a, [b[L][r0] for L in range(32)], [b[L][r1] for L in range(32)])
                for L in range(32): acc[L][tile] = c[L]
    return acc

def dq_items(sdS, sK, BM, BN, DP):
    out = np.zeros((BM, DP))
    for item in range((BM//16)*(DP//16)):
        rg, dd = item // (DP//16), item % (DP//16)
        acc = [[[0.0]*4 for _ in range(2)] for _ in range(32)]
        for kk in range(BN//16):
            a = ldmatrix(sdS, [(rg*16 + (l & 7) + ((l >> 3) & 1)*8, kk*16 + (l >> 4)*8) for l in range(32)], False)
            bb = ldmatrix(sK, [(kk*16 + (l & 15), dd*16 + (l >> 4)*8) for l in range(32)], True)
            for half, r0, r1 in [(0, 0, 1), (1, 2, 3)]:
                c = [acc[L][half] for L in range(32)]
                mma(c, a, [bb[L][r0] for L in range(32)], [bb[L][r1] for L in range(32)])
                for L in range(32): acc[L][half] = c[L]
        for L in range(32):
            g, t = L // 4, L % 4
            for half in range(2):
                for e in range(4):
                    r = rg*16 + g + (e >> 1)*8; col = dd*16 + half*8 + 2*t + (e & 1)
                    out[r, col] = acc[L][half][e]
    return out

DP, BN, BM, PAD = 32, 32, 32, 8
sQ = rng.standard_normal((BM, DP + PAD)); sK = rng.standard_normal((BN, DP + PAD))
row0 = 16
S = gather(mma_abt(sQ, row0, sK, DP, BN), BN//8)
errs = {"S = Q K^T": np.abs(S - sQ[row0:row0+16, :DP] @ sK[:BN, :DP].T).max()}
P = rng.standard_normal((16, BN))
pfr = [[None]*(BN//8) for _ in range(32)]
for L in range(32):
    g, t = L // 4, L % 4
    for nt in range(BN//8):
        pfr[L][nt] = [P[g, nt*8+2*t], P[g, nt*8+2*t+1], P[g+8, nt*8+2*t], P[g+8, nt*8+2*t+1]]
sV = rng.standard_normal((BN, DP + PAD))
O = gather(mma_pb(pfr, sV, DP, BN), DP//8)
errs["O = P V"] = np.abs(O - P @ sV[:BN, :DP]).max()
sdS = rng.standard_normal((BM, BN + PAD))
DQ = dq_items(sdS, sK, BM, BN, DP)
errs["dQ = dS K"] = np.abs(DQ - sdS[:, :BN] @ sK[:BN, :DP]).max()
# dK/dV phase 2: keys 16..31 of a query-major P (BM x BN), head-dim columns 16..47 of dO
sP = rng.standard_normal((BM, BN + PAD)); sdO = rng.standard_normal((BM, 64 + PAD))
DV = gather(mma_atb(sP, 16, sdO, 16, BM, 32), 32//8)
errs["dV = P^T dO"] = np.abs(DV - sP[:BM, 16:32].T @ sdO[:BM, 16:48]).max()
for name, err in errs.items():
    print(f"{name:12s} max err {err:.2e}")
raise SystemExit(0 if max(errs.values()) < 1e-9 else 1)
