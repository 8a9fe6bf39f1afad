"""preact_fused.graphs.GraphedStep without a GPU: the recorder that stands in for the CUDA graph runs
the captured step on the static buffers, so warm-up, capture, replay, recapture on a learning-rate
change and the losses against the plain step are all checked on the CPU."""
import pytest
import torch
import torch.nn.functional as F

import preact_fused
from preact_fused.graphs import GraphedStep, graph_unsupported_reason


def _model_and_opt():
    torch.manual_seed(0)
    model = preact_fused.preact_resnet(20, block="basic", fused=True, backend="reference")
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def test_graphed_step_matches_the_plain_step(one_thread):
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(6)]
    model, opt = _model_and_opt()
    plain = []
    for step, (x, y) in enumerate(data):
        if step == 4:
            opt.param_groups[0]["lr"] = 0.01
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        plain.append(loss.item())
    model2, opt2 = _model_and_opt()
    graphed = GraphedStep(lambda x, y: F.cross_entropy(model2(x), y), opt2, warmup=2, emulate=True)
    losses = []
    for step, (x, y) in enumerate(data):
        if step == 4:
            opt2.param_groups[0]["lr"] = 0.01   # a schedule: the step is captured again
        losses.append(graphed(x, y).item())
    assert losses == plain
    assert graphed.captures == 2 and graphed.steps == 6
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    with pytest.raises(ValueError, match="fixed shapes"):
        graphed(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))


def test_graphs_need_a_gpu_and_a_warmup():
    assert "CUDA" in graph_unsupported_reason("cpu")
    model, opt = _model_and_opt()
    with pytest.raises(ValueError, match="warm-up"):
        GraphedStep(lambda x: model(x).sum(), opt, warmup=0)


def test_train_cli_refuses_cuda_graphs_on_cpu(tmp_path, capsys):
    from preact_fused import train

    status = train.main(["--synthetic", "--device", "cpu", "--depth", "20", "--block", "basic", "--epochs", "1",
                         "--train-subset", "8", "--test-subset", "8", "--batch-size", "4", "--cuda-graphs",
                         "--no-progress", "--no-plot", "--out", str(tmp_path)])
    assert status == 2 and "--cuda-graphs: CUDA graphs need a CUDA device" in capsys.readouterr().err
