"""Training-step time of a GPT-2-small-sized model (12 layers, 12 heads, d 768, vocab 50257,
context 1024, batch 8) in plain PyTorch: bf16 autocast, AdamW, synthetic tokens made on the
CPU. 5 warm-up steps, then N timed steps (default 30), each bracketed by
torch.cuda.synchronize(). Prints one JSON line:
{"step_ms_median", "step_ms_p90", ..., "steps", "seq", "batch", "libcuda"}.

    python3 gpt2_train.py [--steps N] [--warmup N] [--seq 1024] [--batch 8] [--device cuda]"""
import argparse
import math
import time

import torch
from torch import nn
from torch.nn import functional as F

from overhead_common import emit, percentile

VOCAB, LAYERS, HEADS, D = 50257, 12, 12, 768


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D)
        self.fc = nn.Linear(D, 4 * D)
        self.fc_out = nn.Linear(4 * D, D)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (z.view(b, t, HEADS, D // HEADS).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(b, t, D))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, seq):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D)
        self.wpe = nn.Embedding(seq, D)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.wte.weight  # tied, as in GPT-2
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * LAYERS) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, VOCAB).float(), targets.reshape(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test the script")
    args = ap.parse_args()
    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = GPT(args.seq).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev == "cuda")
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=gen).to(dev)
               for _ in range(4)]

    def step(i):
        data = batches[i % len(batches)]
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup):
        step(i)
    sync()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = step(i)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    emit("step_ms", times, steps=args.steps, warmup=args.warmup, seq=args.seq, batch=args.batch,
         tokens_per_s=round(args.batch * args.seq / (percentile(times, 50) / 1e3), 1),
         final_loss=round(loss.item(), 4),
         params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
         max_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else 0)


if __name__ == "__main__":
    main()
