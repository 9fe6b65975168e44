"""100 training steps of a small transformer (2-layer nn.TransformerEncoder, d_model 128)
on synthetic data made on the CPU with a fixed generator, in deterministic mode. Prints one
line per step, `step N loss %.9e`; compare_loss.py compares two such outputs."""
import os
import sys

# cuBLAS reproducibility; must be set before CUDA (and cuBLAS) initialize.
os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"

import torch  # noqa: E402
from torch import nn  # noqa: E402

from apps_common import device, report_libcuda  # noqa: E402

VOCAB, D_MODEL, HEADS, LAYERS, SEQ, BATCH, STEPS = 512, 128, 4, 2, 64, 16, 100


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


def main():
    dev = device()
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else STEPS
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
    print("PASS")


if __name__ == "__main__":
    main()
