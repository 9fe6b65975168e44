"""torch.cuda graphs: warm up on a side stream, capture a small model's forward pass on a
static input, replay it with new inputs copied in, and check each replay against eager
execution (to 1e-5). Then a captured training step (forward, backward, SGD step) replayed
several times. Prints sums of the outputs (CPU float64, all digits)."""
import torch
from torch import nn

from apps_common import device, fmt, report_libcuda


def model_for(gen_seed):
    torch.manual_seed(gen_seed)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def warm_up(fn, n=3):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(s)


def inference(dev, gen):
    model = model_for(0).to(dev).eval()
    static_in = torch.zeros(32, 64, device=dev)
    with torch.no_grad():
        warm_up(lambda: model(static_in))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_in)
        ok = True
        for i in range(6):
            static_in.copy_(torch.randn(32, 64, generator=gen).to(dev))
            graph.replay()
            eager = model(static_in)
            close = torch.allclose(static_out, eager, rtol=1e-5, atol=1e-6)
            ok = ok and close
            print(f"replay {i} sum {fmt(static_out.cpu().double().sum())} "
                  f"first {fmt(static_out[0, 0].item())} close to eager {close}", flush=True)
    return ok


def training(dev, gen):
    model = model_for(1).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # capturable: plain tensor ops
    loss_fn = nn.MSELoss()
    static_x = torch.randn(16, 64, generator=gen).to(dev)
    static_y = torch.randn(16, 10, generator=gen).to(dev)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(static_x), static_y)
        loss.backward()
        opt.step()
        return loss

    warm_up(step)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = loss_fn(model(static_x), static_y)
        static_loss.backward()
        opt.step()
    for i in range(5):
        static_x.copy_(torch.randn(16, 64, generator=gen).to(dev))
        static_y.copy_(torch.randn(16, 10, generator=gen).to(dev))
        graph.replay()
        print(f"train replay {i} loss {fmt(static_loss.item())}", flush=True)
    w = sum(p.detach().cpu().double().sum() for p in model.parameters())
    print(f"weights sum {fmt(w)}", flush=True)


def main():
    dev = device()
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(7)
    ok = inference(dev, gen)
    training(dev, gen)
    report_libcuda()
    print("PASS" if ok else "FAIL a replay differs from eager execution")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
