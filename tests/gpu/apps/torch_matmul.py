"""bf16 and fp32 matmuls (plain, batched, and linear-with-bias, which goes through
cuBLASLt), inputs made on the CPU with a fixed generator. Prints the float64 sum of each
result on the CPU, its largest magnitude and a hash of its bytes: native and slice runs
use the same kernels, so every line must be identical."""
import hashlib

import torch

from apps_common import device, fmt, report_libcuda


def digest(t):
    raw = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()[:16]


def show(name, t):
    c = t.detach().cpu()
    print(f"{name} shape {tuple(c.shape)} sum {fmt(c.double().sum())} "
          f"absmax {fmt(c.double().abs().max())} sha {digest(c)}", flush=True)


def main():
    dev = device()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(1234)
    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).replace("torch.", "")
        for m, k, n in ((256, 512, 128), (1024, 1024, 1024), (77, 300, 515)):
            a = torch.randn(m, k, generator=g).to(dtype).to(dev)
            b = torch.randn(k, n, generator=g).to(dtype).to(dev)
            show(f"{tag} mm {m}x{k}x{n}", a @ b)
        x = torch.randn(8, 64, 96, generator=g).to(dtype).to(dev)
        y = torch.randn(8, 96, 48, generator=g).to(dtype).to(dev)
        show(f"{tag} bmm", torch.bmm(x, y))
        w = torch.randn(256, 512, generator=g).to(dtype).to(dev)
        bias = torch.randn(256, generator=g).to(dtype).to(dev)
        inp = torch.randn(64, 512, generator=g).to(dtype).to(dev)
        show(f"{tag} linear", torch.nn.functional.linear(inp, w, bias))
    report_libcuda()
    print("PASS")


if __name__ == "__main__":
    main()
