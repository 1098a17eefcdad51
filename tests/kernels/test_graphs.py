"""GraphedForward: a plain call on the CPU; on CUDA, bucketed graph replays equal eager calls."""

import pytest
import torch

from kernels.graphs import GraphedForward


def _toy_net(device: torch.device) -> torch.nn.Module:
    """A per-image network (conv, GroupNorm, time and label embeddings), like the UNet's blocks."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.norm = torch.nn.GroupNorm(4, 8)
            self.label = torch.nn.Embedding(10, 8)
            self.out = torch.nn.Conv2d(8, 3, 3, padding=1)

        def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            h = self.conv(x) + torch.sin(t)[:, None, None, None]
            if y is not None:
                h = h + self.label(y)[:, :, None, None]
            return self.out(torch.nn.functional.silu(self.norm(h)))

    return Net().to(device).eval()


def test_bucket_choice() -> None:
    graphed = GraphedForward(lambda x, t, y=None: x, buckets=(4, 1, 2))
    assert [graphed.bucket(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, None]


def test_cpu_calls_the_function_directly() -> None:
    calls: list[int] = []

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(x.shape[0])
        return x * 2

    x = torch.randn(3, 3, 4, 4)
    out = GraphedForward(fn)(x, torch.zeros(3))
    assert calls == [3] and torch.equal(out, x * 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA device is needed")
def test_gpu_gradients_bypass_the_graph() -> None:
    """An attack differentiates through the purifier: a replay has no autograd graph, so it runs eagerly."""
    cuda = torch.device("cuda")
    net = _toy_net(cuda)
    graphed = GraphedForward(net, buckets=(4,))
    x = torch.randn(3, 3, 8, 8, device=cuda, requires_grad=True)
    t = torch.rand(3, device=cuda)
    graphed(x, t).square().sum().backward()
    assert graphed._graphs == {}
    expected = torch.autograd.grad(net(x, t).square().sum(), x)[0]
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA device is needed")
def test_gpu_replays_match_eager() -> None:
    cuda = torch.device("cuda")
    net = _toy_net(cuda)
    graphed = GraphedForward(net, buckets=(1, 2, 4, 8))
    with torch.no_grad():
        for n in (1, 3, 5, 3, 8, 11):
            x = torch.randn(n, 3, 8, 8, device=cuda).contiguous(memory_format=torch.channels_last)
            t = torch.rand(n, device=cuda)
            y = torch.randint(0, 10, (n,), device=cuda)
            for labels in (None, y):
                expected = net(x, t, labels)
                actual = graphed(x, t, labels)
                assert actual.shape == expected.shape
                torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
        first = graphed(x[:1], t[:1])
        graphed(x[1:2], t[1:2])
        torch.testing.assert_close(first, net(x[:1], t[:1]), atol=1e-4, rtol=1e-4)
    assert len(graphed._graphs) == 6  # buckets 1, 4, 8 (n = 11 runs eagerly), with and without labels
