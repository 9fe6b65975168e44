"""100 training steps of a small transformer (2-layer nn.TransformerEncoder, d_model 128)
on synthetic data made on the CPU with a fixed generator, in deterministic mode. Prints one
line per step, `step N loss %.9e`; compare_loss.py compares two such outputs.

    python3 torch_train.py [STEPS] [--steps STEPS] [--ballast-gib GIB]

--ballast-gib (bench/memory/torch_reclaim.py) first fills a GIB GiB tensor on the device with
a pattern of its element indices (`ballast filled BYTES bytes`), so that the process holds
that much memory while it trains; after the last step it checks every element and prints
`ballast ok`, or `ballast CORRUPT ...` and exits 1 without PASS. Every line is flushed, so
a reader on a pipe sees each step as it ends. Without options the output is unchanged."""
import argparse
import os
import sys

# cuBLAS reproducibility; must be set before CUDA (and cuBLAS) initialize.
os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"

import torch  # noqa: E402
from torch import nn  # noqa: E402

from apps_common import device, report_libcuda  # noqa: E402

VOCAB, D_MODEL, HEADS, LAYERS, SEQ, BATCH, STEPS = 512, 128, 4, 2, 64, 16, 100
GIB = 1 << 30
# Ballast elements (int32) filled or checked at a time: 256 MiB, plus 512 MiB of int64 indices.
CHUNK = 64 << 20


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Parameter(torch.randn(SEQ, D_MODEL) * 0.02)
        layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, dim_feedforward=4 * D_MODEL,
                                           dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ))

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos
        x = self.encoder(x, mask=self.mask, is_causal=True)
        return self.head(self.norm(x))


def ballast_pattern(start, end, dev):
    """Elements [start, end) of the ballast: (index * 40503 + 12345) mod 2^31, distinct for
    up to 2^31 elements (40503 is odd), so that a chunk moved elsewhere does not match."""
    idx = torch.arange(start, end, dtype=torch.int64, device=dev)
    return idx.mul_(40503).add_(12345).bitwise_and_(0x7FFFFFFF).to(torch.int32)


def make_ballast(gib, dev):
    n = int(gib * GIB) // 4
    ballast = torch.empty(n, dtype=torch.int32, device=dev)
    for start in range(0, n, CHUNK):
        end = min(n, start + CHUNK)
        ballast[start:end] = ballast_pattern(start, end, dev)
    # Filled on the device before the first step, not still queued.
    ballast[-1:].cpu()
    print(f"ballast filled {n * 4} bytes", flush=True)
    return ballast


def check_ballast(ballast, dev):
    """Every element against its pattern; prints the result, returns True when intact."""
    n = ballast.numel()
    bad = []
    for start in range(0, n, CHUNK):
        end = min(n, start + CHUNK)
        if not torch.equal(ballast[start:end], ballast_pattern(start, end, dev)):
            bad.append(start * 4)
    if bad:
        print(f"ballast CORRUPT {len(bad)} of {(n + CHUNK - 1) // CHUNK} chunks differ, "
              f"first at byte {bad[0]}", flush=True)
        return False
    print("ballast ok", flush=True)
    return True


def parse_args():
    ap = argparse.ArgumentParser(description="Deterministic training of a small transformer.")
    ap.add_argument("steps", nargs="?", type=int, default=STEPS, help="training steps")
    ap.add_argument("--steps", dest="steps_opt", type=int, default=None, help="training steps")
    ap.add_argument("--ballast-gib", type=float, default=0.0,
                    help="GiB of patterned device memory to hold while training, checked at the end")
    args = ap.parse_args()
    if args.steps_opt is not None:
        args.steps = args.steps_opt
    return args


def main():
    dev = device()
    args = parse_args()
    steps = args.steps
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.enabled = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    # The math attention kernel: deterministic forward and backward.
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_math_sdp(True)

    ballast = make_ballast(args.ballast_gib, dev) if args.ballast_gib > 0 else None

    model = TinyLM().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(42)
    # A learnable task: the next token is a fixed function of the current one.
    data = torch.randint(0, VOCAB, (8 * BATCH, SEQ + 1), generator=gen)
    data[:, 1:] = (data[:, :-1] * 7 + 3) % VOCAB
    noise = torch.rand(data.shape, generator=gen) < 0.1
    data[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=gen)
    data = data.to(dev)
    model.train()
    for step in range(steps):
        i = (step % 8) * BATCH
        batch = data[i:i + BATCH]
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        print(f"step {step} loss {loss.item():.9e}", flush=True)
        if step == 0:
            report_libcuda()
    if ballast is not None and not check_ballast(ballast, dev):
        sys.exit(1)
    print("PASS")


if __name__ == "__main__":
    main()
