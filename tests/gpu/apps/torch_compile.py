"""torch.compile (default inductor backend) on a small MLP: on CUDA inductor generates
Triton kernels, which must compile and load through the slice. Runs inference and one
compiled training step, prints output sums (CPU float64, all digits), how close they are to
eager execution, and inductor's counters. Inductor's deterministic mode and a disabled FX
graph cache make the kernels, and so the output, the same on every fresh run."""
import torch
import torch._inductor.config as inductor_config
import torch._inductor.metrics as inductor_metrics
from torch import nn
from torch._dynamo.utils import counters

from apps_common import device, fmt, report_libcuda


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(128, 512)
        self.fc2 = nn.Linear(512, 512)
        self.fc3 = nn.Linear(512, 16)
        self.norm = nn.LayerNorm(512)

    def forward(self, x):
        h = nn.functional.gelu(self.fc1(x))
        h = self.norm(torch.tanh(self.fc2(h)) * 0.5 + h)
        return torch.softmax(self.fc3(h), dim=-1) + h.mean(dim=-1, keepdim=True)


def main():
    dev = device()
    inductor_config.deterministic = True
    inductor_config.fx_graph_cache = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = MLP().to(dev)
    compiled = torch.compile(model)
    gen = torch.Generator().manual_seed(3)
    ok = True
    with torch.no_grad():
        for i in range(3):
            x = torch.randn(64, 128, generator=gen).to(dev)
            y = compiled(x)
            close = torch.allclose(y, model(x), rtol=1e-4, atol=1e-5)
            ok = ok and close
            print(f"inference {i} sum {fmt(y.cpu().double().sum())} close to eager {close}",
                  flush=True)
    report_libcuda()

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(3):
        x = torch.randn(64, 128, generator=gen).to(dev)
        loss = compiled(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"train {i} loss {fmt(loss.item())}", flush=True)
    w = sum(p.detach().cpu().double().sum() for p in model.parameters())
    print(f"weights sum {fmt(w)}", flush=True)

    graphs = counters["stats"]["unique_graphs"]
    kernels = inductor_metrics.generated_kernel_count
    print(f"compiled graphs {graphs} generated kernels {kernels}")
    if graphs < 1 or kernels < 1:
        ok = False
        print("FAIL nothing was compiled")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
