"""A decode-like loop of many small kernels: a tiny Llama-style model (12 layers, d 512,
8 heads, bf16 weights, RMSNorm, rotary embeddings, SwiGLU MLP, a KV cache) generating one
token at a time for batch 1, in eager PyTorch without CUDA graphs. A token takes about 600
operations, nearly all of them small kernel launches (counted once, as ops_per_token), and
a .item() on the next token (a DtoH copy and a synchronize) as a real sampling loop does.
Prints one JSON line with the per-token time:
{"token_ms_median", "token_ms_p90", ..., "tokens", "ops_per_token", "libcuda"}.

    python3 decode_loop.py [--tokens 256] [--warmup 32] [--device cuda]"""
import argparse
import time

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from overhead_common import emit

LAYERS, D, HEADS, FFN, VOCAB = 12, 512, 8, 1408, 32000
HD = D // HEADS


def rmsnorm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def rope(x, cos, sin):
    x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class TinyLlama:
    def __init__(self, dev, max_len):
        g = torch.Generator().manual_seed(0)

        def w(*shape, scale=0.02):
            return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16).to(dev)

        self.embed = w(VOCAB, D)
        self.layers = [dict(n1=torch.ones(D, dtype=torch.bfloat16, device=dev), qkv=w(D, 3 * D),
                            o=w(D, D), n2=torch.ones(D, dtype=torch.bfloat16, device=dev),
                            gate=w(D, FFN), up=w(D, FFN), down=w(FFN, D))
                       for _ in range(LAYERS)]
        self.norm = torch.ones(D, dtype=torch.bfloat16, device=dev)
        self.head = w(D, VOCAB)
        shape = (1, HEADS, max_len, HD)
        self.k = [torch.zeros(shape, dtype=torch.bfloat16, device=dev) for _ in range(LAYERS)]
        self.v = [torch.zeros(shape, dtype=torch.bfloat16, device=dev) for _ in range(LAYERS)]
        inv = 1.0 / (10000 ** (torch.arange(0, HD // 2, dtype=torch.float32) / (HD // 2)))
        ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        self.cos = ang.cos().to(torch.bfloat16).to(dev)
        self.sin = ang.sin().to(torch.bfloat16).to(dev)

    @torch.no_grad()
    def step(self, tok, pos):
        """tok: a (1, 1) device tensor; returns the next token as a (1, 1) device tensor."""
        x = self.embed[tok]  # (1, 1, D)
        cos, sin = self.cos[pos], self.sin[pos]
        for i, p in enumerate(self.layers):
            h = rmsnorm(x, p["n1"])
            q, k, v = (h @ p["qkv"]).split(D, dim=-1)
            q, k, v = (z.view(1, 1, HEADS, HD).transpose(1, 2) for z in (q, k, v))
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            self.k[i][:, :, pos:pos + 1] = k
            self.v[i][:, :, pos:pos + 1] = v
            att = (q @ self.k[i][:, :, :pos + 1].transpose(-1, -2)) * (HD ** -0.5)
            y = torch.softmax(att.float(), dim=-1).to(torch.bfloat16) @ self.v[i][:, :, :pos + 1]
            x = x + y.transpose(1, 2).reshape(1, 1, D) @ p["o"]
            h = rmsnorm(x, p["n2"])
            x = x + (F.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]
        logits = rmsnorm(x, self.norm) @ self.head
        return logits.argmax(dim=-1)


class OpCounter(TorchDispatchMode):
    """Counts the non-view aten operations run (about one kernel each)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not getattr(func, "is_view", False):
            self.ops += 1
        return func(*args, **(kwargs or {}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=32)
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test the script")
    args = ap.parse_args()
    dev = args.device
    max_len = args.warmup + args.tokens + 1
    model = TinyLlama(dev, max_len)
    tok = torch.ones(1, 1, dtype=torch.long, device=dev)
    with OpCounter() as counter:
        model.step(tok, 0)
    ops = counter.ops
    times, generated = [], []
    for pos in range(args.warmup + args.tokens):
        t0 = time.perf_counter()
        tok = model.step(tok, pos)
        generated.append(tok.item())  # synchronizes, like a sampling loop checking for EOS
        if pos >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    emit("token_ms", times, tokens=args.tokens, warmup=args.warmup, layers=LAYERS,
         ops_per_token=ops, tokens_checksum=sum(generated) % 1000003)


if __name__ == "__main__":
    main()
